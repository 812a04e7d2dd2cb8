"""TVP text side: our WordPiece tokenizer gives the ids and masks of transformers' BERT tokenizers (test-only)."""

from __future__ import annotations

import string

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tvlt_core.text import SPECIAL_TOKENS, TextTokenizer, build_vocab  # noqa: E402

WORDS = "the a person opens door run ##ning quick ##ly cafe owner dog jump ##s times test is in kitchen then".split()
SENTENCES = [
    "The person opens the door.",
    "A Person is RUNNING quickly!!",
    "Café owner's dog jumps 3 times",
    "中文 test with unknownwordxyz",
    "  tabs\tand\nnew lines  ",
    "",
    "the person runs in the kitchen then closes it " * 8,  # longer than max_text_length: truncated
]


def bert_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = SPECIAL_TOKENS + chars + ["##" + c for c in string.ascii_lowercase] + WORDS + ["中"]
    return list(dict.fromkeys(tokens))


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab")
    (path / "vocab.txt").write_text("".join(t + "\n" for t in bert_vocab()), encoding="utf-8")
    return path


@pytest.mark.parametrize("reference", ["BertTokenizer", "BertTokenizerFast"])
def test_vocab_txt_matches_reference_tokenizers(vocab_dir, reference):
    ours = TextTokenizer.from_folder(str(vocab_dir), max_text_length=24)
    ref = getattr(transformers, reference)(str(vocab_dir / "vocab.txt"), do_lower_case=True)
    expected = ref(SENTENCES, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    got = ours(SENTENCES)
    assert got["input_ids"].shape == (len(SENTENCES), 24) and got["input_ids"].dtype == torch.long
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert got["input_ids"][-1, -1] == ours.tokenizer.token_to_id("[SEP]")  # truncation keeps [SEP]
    assert (got["input_ids"] == ours.tokenizer.token_to_id("[UNK]")).any()  # unknown words are [UNK], not dropped


def test_tokenizer_json_and_cased_vocab_match_reference(tmp_path, vocab_dir):
    # A folder saved by transformers holds tokenizer.json: we read that file instead of vocab.txt.
    transformers.BertTokenizerFast(str(vocab_dir / "vocab.txt")).save_pretrained(str(tmp_path / "fast"))
    ours = TextTokenizer.from_folder(str(tmp_path / "fast"), max_text_length=16)
    expected = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "fast"))(
        SENTENCES, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    assert torch.equal(ours(SENTENCES)["input_ids"], expected["input_ids"])

    # do_lower_case=False in tokenizer_config.json: case (and accents) are kept, so "The" is no longer "the".
    cased = tmp_path / "cased"
    cased.mkdir()
    (cased / "vocab.txt").write_bytes((vocab_dir / "vocab.txt").read_bytes())
    (cased / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    ours = TextTokenizer.from_folder(str(cased), max_text_length=16)
    ref = transformers.BertTokenizer(str(cased / "vocab.txt"), do_lower_case=False)
    expected = ref(SENTENCES, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(ours(SENTENCES)["input_ids"], expected["input_ids"])
    uncased = TextTokenizer.from_folder(str(vocab_dir), max_text_length=16)
    assert not torch.equal(ours(SENTENCES)["input_ids"], uncased(SENTENCES)["input_ids"])


def test_built_vocab_covers_its_corpus_and_round_trips(tmp_path):
    corpus = [s for s in SENTENCES if s.strip()]
    corpus += ["A red circle spins, then turns blue.", "The green square slides left"]
    vocab = build_vocab(corpus, vocab_size=300)
    assert vocab[:5] == SPECIAL_TOKENS and len(vocab) == len(set(vocab)) <= 300
    tokenizer = TextTokenizer.from_vocab(vocab, max_text_length=64)
    encoded = tokenizer(corpus)
    assert not (encoded["input_ids"] == tokenizer.tokenizer.token_to_id("[UNK]")).any()
    assert tokenizer.decode(encoded["input_ids"][-1].tolist()) == "the green square slides left"

    tokenizer.save(str(tmp_path / "tok"))
    for loaded in (
        TextTokenizer.from_folder(str(tmp_path / "tok"), max_text_length=64),
        TextTokenizer.from_vocab((tmp_path / "tok" / "vocab.txt").read_text().splitlines(), max_text_length=64),
    ):
        assert torch.equal(loaded(corpus)["input_ids"], encoded["input_ids"])
    # transformers reads the folder we write, and agrees on the ids.
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    expected = ref(corpus, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    assert torch.equal(expected["input_ids"], encoded["input_ids"])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_vocab"):
        TextTokenizer.from_folder(str(tmp_path))
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        TextTokenizer.from_vocab(["[PAD]", "[UNK]", "[SEP]", "a"])
    with pytest.raises(ValueError, match="no sentences"):
        build_vocab([])
