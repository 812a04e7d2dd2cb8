"""Command line of the synthetic corpus generator.

    python -m synthetic --out DIR --videos N --seed S [--grounding M] [--broken] [--size WxH] [--fps F]
                                  [--duration A-B] [--audio-rate R] [--gop SECONDS] [--workers W]

Example, the preprocessing benchmark's uniform corpus:
    python -m synthetic --out /tmp/bench --videos 24 --seed 0 --size 640x360 --fps 30 --duration 10-30
"""

from __future__ import annotations

import argparse
import logging

from synthetic.corpus import CorpusInfo, generate_corpus


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 640x360") from None
    return w, h


def _duration(text: str) -> tuple[float, float]:
    try:
        parts = [float(v) for v in text.split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--duration {text!r}: expected SECONDS or LOW-HIGH, e.g. 10-30") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"--duration {text!r}: expected SECONDS or LOW-HIGH, e.g. 10-30")
    return parts[0], parts[-1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--videos", type=int, required=True, help="number of pretraining clips")
    p.add_argument("--seed", type=int, default=0, help="same seed => same files (default 0)")
    p.add_argument("--grounding", type=int, default=0, help="number of grounding videos with annotations")
    p.add_argument("--broken", action="store_true", help="also write one file of every broken kind")
    p.add_argument("--size", type=_size, help="force WIDTHxHEIGHT (even sides: h264 4:2:0)")
    p.add_argument("--fps", type=int, help="force a frame rate")
    p.add_argument("--duration", type=_duration, help="force durations, SECONDS or LOW-HIGH")
    p.add_argument("--audio-rate", type=int, help="force an audio sample rate (Hz)")
    p.add_argument("--gop", type=float, help="keyframe interval in seconds (default 2, like camera files)")
    p.add_argument("--workers", type=int, help="writer processes (default: one per core)")
    return p


def main(argv: list[str] | None = None) -> CorpusInfo:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return generate_corpus(args.out, args.videos, args.grounding, args.seed, args.broken, size=args.size,
                           fps=args.fps, duration=args.duration, audio_rate=args.audio_rate, gop_seconds=args.gop,
                           workers=args.workers)
