"""TVP's text side: a BERT WordPiece tokenizer through the ``tokenizers`` library, and vocabulary building.

    sentences (list[str]) -> lower-case, strip accents, split on whitespace and punctuation (bert-base-uncased)
      -> WordPiece -> [CLS] ... [SEP], truncated and padded with [PAD] to ``max_text_length``
      -> input_ids (B, max_text_length) int64, attention_mask (B, max_text_length) int64 (1 = real token)

A checkpoint folder (local or fsspec URL) carries the vocabulary as ``tokenizer.json`` (preferred when present)
or ``vocab.txt`` (one token per line, id = line number), as Hugging Face BERT tokenizers save it. Corpora without
a pretrained vocabulary (the synthetic one) get one from ``build_vocab`` over their annotation sentences;
``TextTokenizer.files()`` gives the bytes to save beside the model (``save_pretrained(..., extra_files=...)``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import fsspec
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tvlt_core.input_spec import TVP_MAX_TEXT_LENGTH

log = logging.getLogger(__name__)

VOCAB_NAME = "vocab.txt"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # ids 0-4 in vocabularies we build; [PAD] = 0 as in BERT
DEFAULT_MAX_TEXT_LENGTH = TVP_MAX_TEXT_LENGTH
DEFAULT_VOCAB_SIZE = 2000  # WordPiece tokens of a vocabulary built from query sentences


def _bert_pipeline(model: models.Model, lowercase: bool) -> Tokenizer:
    """A WordPiece model behind bert-base-uncased's normaliser and pre-tokeniser, before special tokens exist."""
    tokenizer = Tokenizer(model)
    # strip_accents=None follows ``lowercase``, as BertTokenizer's strip_accents default does.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def build_vocab(sentences: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 1) -> list[str]:
    """Train a WordPiece vocabulary on ``sentences`` (lower-cased like bert-base-uncased).

    Returns:
        tokens in id order: the five special tokens first ([PAD] = 0, [UNK] = 1, [CLS] = 2, [SEP] = 3,
        [MASK] = 4), then every character seen and its ``##`` continuation, then whole words and word pieces by
        frequency, at most ``vocab_size`` tokens in all (fewer when the corpus is small).
    """
    tokenizer = _bert_pipeline(models.WordPiece(unk_token=UNK), lowercase=True)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS or len(tokens) <= len(SPECIAL_TOKENS):
        raise ValueError("build_vocab: no sentences to learn a vocabulary from")
    log.info("built a WordPiece vocabulary of %d tokens", len(tokens))
    return tokens


class TextTokenizer:
    """Sentences to fixed-length ``input_ids`` / ``attention_mask`` batches for TVP.

    Build with ``from_folder`` (a checkpoint folder's tokenizer.json / vocab.txt) or ``from_vocab`` (a token list,
    e.g. from ``build_vocab``); calling it on a list of sentences returns the two (B, max_text_length) tensors.
    """

    def __init__(self, tokenizer: Tokenizer, max_text_length: int = DEFAULT_MAX_TEXT_LENGTH, lowercase: bool = True):
        for token in (PAD, CLS, SEP, UNK):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"the vocabulary has no {token} token; is this a BERT WordPiece vocabulary?")
        if max_text_length < 2:
            raise ValueError(f"max_text_length={max_text_length}: need room for [CLS] and [SEP]")
        self.tokenizer, self.max_text_length, self.lowercase = tokenizer, max_text_length, lowercase
        # Mark them special (ids unchanged): kept whole inside sentences and skipped by decode, as in transformers.
        tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is not None])
        cls_id, sep_id = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
        tokenizer.post_processor = processors.BertProcessing((SEP, sep_id), (CLS, cls_id))
        tokenizer.enable_truncation(max_length=max_text_length)
        tokenizer.enable_padding(length=max_text_length, pad_id=self.pad_token_id, pad_token=PAD)

    @classmethod
    def from_vocab(
        cls, vocab: list[str], max_text_length: int = DEFAULT_MAX_TEXT_LENGTH, lowercase: bool = True
    ) -> TextTokenizer:
        """Tokens in id order (the lines of a ``vocab.txt``)."""
        ids = {token: i for i, token in enumerate(vocab)}
        if len(ids) != len(vocab):
            raise ValueError("the vocabulary lists a token twice")
        model = models.WordPiece(vocab=ids, unk_token=UNK, max_input_chars_per_word=100)
        return cls(_bert_pipeline(model, lowercase), max_text_length, lowercase)

    @classmethod
    def from_folder(cls, path: str, max_text_length: int = DEFAULT_MAX_TEXT_LENGTH) -> TextTokenizer:
        """Load from a folder (local or fsspec URL) holding ``tokenizer.json`` or ``vocab.txt``.

        Lower-casing follows ``tokenizer_config.json``'s ``do_lower_case`` for a bare ``vocab.txt`` (default on,
        as bert-base-uncased); a ``tokenizer.json`` carries its own normaliser.
        """
        fs, root = fsspec.core.url_to_fs(path)
        root = root.rstrip("/")
        if fs.exists(f"{root}/{TOKENIZER_NAME}"):
            with fs.open(f"{root}/{TOKENIZER_NAME}", "r", encoding="utf-8") as f:
                tokenizer = Tokenizer.from_str(f.read())
            normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
            return cls(tokenizer, max_text_length, lowercase=bool(normalizer.get("lowercase", True)))
        if not fs.exists(f"{root}/{VOCAB_NAME}"):
            raise FileNotFoundError(
                f"{path}: neither {TOKENIZER_NAME} nor {VOCAB_NAME}; build one with jobs.build_vocab"
            )
        with fs.open(f"{root}/{VOCAB_NAME}", "r", encoding="utf-8") as f:
            vocab = [line.rstrip("\n") for line in f]
        vocab = vocab[:-1] if vocab and vocab[-1] == "" else vocab
        lowercase = True
        if fs.exists(f"{root}/{TOKENIZER_CONFIG_NAME}"):
            with fs.open(f"{root}/{TOKENIZER_CONFIG_NAME}", "r", encoding="utf-8") as f:
                lowercase = bool(json.load(f).get("do_lower_case", True))
        return cls.from_vocab(vocab, max_text_length, lowercase)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.token_to_id(PAD)

    def __call__(self, sentences: str | list[str]) -> dict[str, torch.Tensor]:
        """Returns ``input_ids`` and ``attention_mask``, both (B, max_text_length) int64."""
        batch = self.tokenizer.encode_batch([sentences] if isinstance(sentences, str) else list(sentences))
        return {
            "input_ids": torch.tensor([e.ids for e in batch], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in batch], dtype=torch.long),
        }

    def word_ids(self, sentence: str) -> set[int]:
        """The ids of the sentence's own tokens: no [CLS], [SEP], [PAD] or [UNK] (truncated as ``__call__`` does)."""
        special = {self.tokenizer.token_to_id(t) for t in (PAD, CLS, SEP, UNK)}
        return set(self.tokenizer.encode(sentence).ids) - special

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def files(self) -> dict[str, bytes]:
        """``vocab.txt``, ``tokenizer.json`` and ``tokenizer_config.json``, as a Hugging Face BERT folder holds
        them (``transformers.AutoTokenizer`` reads the folder too)."""
        vocab = self.tokenizer.get_vocab()
        portable = Tokenizer.from_str(self.tokenizer.to_str())
        portable.no_truncation()  # lengths are the caller's choice, not the file's
        portable.no_padding()
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.lowercase,
            "model_max_length": self.max_text_length,
        }
        return {
            VOCAB_NAME: "".join(f"{t}\n" for t in sorted(vocab, key=vocab.__getitem__)).encode("utf-8"),
            TOKENIZER_NAME: portable.to_str().encode("utf-8"),
            TOKENIZER_CONFIG_NAME: json.dumps(config, indent=2).encode("utf-8"),
        }

    def save(self, path: str) -> None:
        """Write ``files()`` into the folder ``path`` (local or fsspec URL)."""
        fs, root = fsspec.core.url_to_fs(path)
        fs.makedirs(root, exist_ok=True)
        for name, data in self.files().items():
            with fs.open(f"{root.rstrip('/')}/{name}", "wb") as f:
                f.write(data)
        log.info("wrote tokenizer (%d tokens) to %s", self.vocab_size, path)
