"""Synthetic audio-visual corpus: real mp4 files (h264 + AAC) with known ground truth, made from a seed.

    python -m synthetic --out /tmp/corpus --videos 40 --grounding 12 --seed 0 --broken

Python API (demo, tests, benchmarks):
    info = generate_corpus(out_dir, n_pretrain=40, n_grounding=12, seed=0, broken=True)
    info.of_kind("pretrain")  -> corpus.json records; info.path(record) -> file path

Modules, in the order a file is made: spec (what each file contains, from the seed), render (pixels and samples),
mp4 (encoding), broken (deliberately bad files), corpus (the whole folder), cli (the command line).
"""

from synthetic.broken import BROKEN_KINDS, BrokenKind
from synthetic.corpus import CorpusInfo, generate_corpus, load_corpus
from synthetic.spec import COLOURS, PITCHES_HZ, SHAPES, class_of

__all__ = ["BROKEN_KINDS", "COLOURS", "PITCHES_HZ", "SHAPES", "BrokenKind", "CorpusInfo", "class_of",
           "generate_corpus", "load_corpus"]
