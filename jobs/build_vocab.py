"""Build a BERT WordPiece vocabulary for TVP from grounding annotation sentences, for corpora with no pretrained one.

    python jobs/build_vocab.py --annotations FILE... --out DIR [--vocab-size N] [--min-frequency F]
                               [--max-text-length L]

Example, the synthetic corpus:
    python -m synthetic --out /tmp/corpus --videos 4 --grounding 8
    python jobs/build_vocab.py --annotations /tmp/corpus/grounding/charades_sta_train.txt --out /tmp/tvp-vocab

FILE is Charades-STA text (``VIDEO_ID START END##SENTENCE``) or, ending in ``.json``, ActivityNet Captions; local
paths or fsspec URLs. DIR receives ``vocab.txt``, ``tokenizer.json`` and ``tokenizer_config.json``, the layout
``tvlt_core.text.TextTokenizer.from_folder`` and Hugging Face tokenizers read; fine-tuning saves these files beside
the model weights, and the model's ``vocab_size`` must equal the size printed here. Build it from the training
split only, so evaluation sentences do not shape the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
from dataclasses import dataclass

import fsspec

from pipelines.annotations import parse_activitynet, parse_charades_sta
from tvlt_core.text import DEFAULT_MAX_TEXT_LENGTH, DEFAULT_VOCAB_SIZE, UNK, TextTokenizer, build_vocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabSummary:
    out: str
    vocab_size: int
    sentences: int
    longest_tokens: int  # longest sentence in tokens, [CLS] and [SEP] included
    truncated: int  # sentences longer than max_text_length
    with_unknown: int  # sentences with an [UNK] token (0 unless min_frequency > 1 or vocab_size is too small)


def read_sentences(urls: list[str]) -> list[str]:
    """Every sentence of every annotation file, in file order (duplicates kept: they count as frequency)."""
    sentences: list[str] = []
    for url in urls:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            text = f.read()
        name = posixpath.basename(url)
        table = parse_activitynet(json.loads(text), name) if url.endswith(".json") else parse_charades_sta(text, name)
        sentences.extend(q.sentence for queries in table.values() for q in queries)
    if not sentences:
        raise ValueError(f"no sentences in {urls}; are these grounding annotation files?")
    return sentences


def build_and_save(
    urls: list[str],
    out: str,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 1,
    max_text_length: int = DEFAULT_MAX_TEXT_LENGTH,
) -> VocabSummary:
    """Read the sentences, train the vocabulary, write the tokenizer files to ``out``, and measure the result."""
    sentences = read_sentences(urls)
    vocab = build_vocab(sentences, vocab_size, min_frequency)
    tokenizer = TextTokenizer.from_vocab(vocab, max_text_length)
    tokenizer.save(out)
    # Measured without truncation (BERT's 512-token ceiling), so a too-small max_text_length shows.
    encoded = TextTokenizer.from_vocab(vocab, max_text_length=512)(sentences)
    lengths = encoded["attention_mask"].sum(dim=1)
    unknown = (encoded["input_ids"] == tokenizer.tokenizer.token_to_id(UNK)).any(dim=1)
    truncated = int((lengths > max_text_length).sum())
    if truncated:
        log.warning("%d sentences exceed max_text_length=%d and will be truncated", truncated, max_text_length)
    return VocabSummary(out, tokenizer.vocab_size, len(sentences), int(lengths.max()), truncated, int(unknown.sum()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/build_vocab.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--annotations", nargs="+", required=True, metavar="FILE", help="annotation files or URLs")
    p.add_argument("--out", required=True, help="output folder or URL (created)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"at most this many tokens (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--min-frequency", type=int, default=1, help="drop pieces seen fewer times (default 1)")
    p.add_argument("--max-text-length", type=int, default=DEFAULT_MAX_TEXT_LENGTH,
                   help="tokens per sentence after padding, [CLS] and [SEP] included (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> VocabSummary:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = build_and_save(args.annotations, args.out, args.vocab_size, args.min_frequency, args.max_text_length)
    print(
        f"vocabulary: {summary.vocab_size} tokens from {summary.sentences} sentences -> {summary.out}\n"
        f"longest sentence: {summary.longest_tokens} tokens (max_text_length {args.max_text_length}, "
        f"{summary.truncated} truncated); sentences with [UNK]: {summary.with_unknown}\n"
        f"set the model's vocab_size to {summary.vocab_size}"
    )
    return summary


if __name__ == "__main__":
    main()
