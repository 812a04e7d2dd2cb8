"""Generate a whole corpus: plan every file from the seed, write them in worker processes, then the Charades-STA
annotation files and, last, corpus.json (so a folder with corpus.json is a complete corpus).

Layout under ``out_dir``:
    pretrain/pt_00000.mp4 ...                  class-labelled clips (audio-visual correspondence)
    grounding/gr_00000.mp4 ...                 videos with timed events
    grounding/charades_sta_{train,test}.txt    ``video_id start end##sentence``, split by video
    broken/<kind>.mp4                          only with broken=True, one file per BrokenKind
    corpus.json                                ground truth of every file (see VideoSpec.record)
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from synthetic.broken import BY_NAME, plan_broken, write_broken
from synthetic.mp4 import write_mp4
from synthetic.render import render
from synthetic.spec import (COLOURS, N_CLASSES, Overrides, VideoSpec, assign_splits, class_of,
                                      plan_grounding, plan_pretrain)

log = logging.getLogger(__name__)

CORPUS_JSON = "corpus.json"
# Bumped whenever the same seed gives different files, so a corpus made by an older generator is not reused
# (2: pretraining shapes larger and kept inside the centre crop).
FORMAT_VERSION = 2
ANNOTATION_FILES = {"train": "grounding/charades_sta_train.txt", "test": "grounding/charades_sta_test.txt"}


@dataclass
class CorpusInfo:
    """A generated corpus: its folder, seed and the corpus.json record of every file."""

    root: Path
    seed: int
    videos: list[dict]
    wall_s: float = 0.0

    def of_kind(self, kind: str) -> list[dict]:
        return [v for v in self.videos if v["kind"] == kind]

    def path(self, record: dict) -> Path:
        return self.root / record["path"]

    def annotation_file(self, split: str) -> Path:
        return self.root / ANNOTATION_FILES[split]

    @property
    def total_seconds(self) -> float:
        """Seconds of video in the readable pretraining and grounding files."""
        return sum(v["duration"] for v in self.videos if v["kind"] != "broken")

    @property
    def total_bytes(self) -> int:
        return sum(v["bytes"] for v in self.videos)

    def summary(self) -> str:
        counts = Counter(v["kind"] for v in self.videos)
        files = ", ".join(f"{counts[k]} {k}" for k in ("pretrain", "grounding", "broken") if counts[k])
        n_good = counts["pretrain"] + counts["grounding"]
        rate = (f"; {n_good / self.wall_s:.2f} videos/s, {self.total_seconds / self.wall_s:.1f} s of video per s"
                if self.wall_s > 0 else "")
        return (f"synthetic corpus in {self.root}: {files or 'no files'}; {self.total_seconds:.1f} s of video; "
                f"{self.total_bytes / 1e6:.1f} MB; {self.wall_s:.1f} s wall{rate}")


def plan_corpus(n_pretrain: int, n_grounding: int, seed: int, broken: bool,
                overrides: Overrides = Overrides()) -> list[VideoSpec]:
    """Every file's spec, in corpus order (pretrain, grounding, broken)."""
    if n_pretrain < 0 or n_grounding < 0:
        raise ValueError(f"file counts must be >= 0, got pretrain={n_pretrain} grounding={n_grounding}")
    pretrain = [plan_pretrain(seed, i, overrides) for i in range(n_pretrain)]
    grounding = assign_splits([plan_grounding(seed, i, overrides) for i in range(n_grounding)], seed)
    return pretrain + grounding + (plan_broken(seed) if broken else [])


def write_file(spec: VideoSpec, root: str) -> int:
    """Write one planned file under ``root``; returns its size in bytes. Runs in a worker process."""
    path = Path(root) / spec.path
    if spec.kind == "broken":
        write_broken(path, spec)
        return path.stat().st_size
    frames, audio = render(spec)
    return write_mp4(path, spec.media, frames, audio)


def _cost(spec: VideoSpec) -> int:
    m = spec.media
    return m.n_frames * m.width * m.height


def _write_all(specs: list[VideoSpec], root: Path, workers: int) -> dict[str, int]:
    """Write every file, biggest first so the workers finish together; returns bytes per video id."""
    order = sorted(specs, key=_cost, reverse=True)
    if workers <= 1 or len(specs) <= 1:
        return {s.video_id: write_file(s, str(root)) for s in order}
    # spawn, not fork: the caller may be a process with threads (Ray, torch) that fork would copy mid-state.
    with ProcessPoolExecutor(min(workers, len(specs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {s.video_id: pool.submit(write_file, s, str(root)) for s in order}
        return {vid: f.result() for vid, f in futures.items()}


def _annotation_lines(specs: list[VideoSpec], split: str) -> list[str]:
    return [f"{s.video_id} {e.start:.2f} {e.end:.2f}##{e.sentence}"
            for s in specs if s.kind == "grounding" and s.split == split for e in s.events]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def corpus_options(*, size: tuple[int, int] | None = None, fps: int | None = None,
                   duration: tuple[float, float] | None = None, audio_rate: int | None = None,
                   gop_seconds: float | None = None) -> dict:
    """The ``options`` entry of corpus.json for these ``generate_corpus`` arguments (tuples as JSON lists), so a
    caller can tell whether a corpus on disk was made with the settings it wants."""
    values = {"size": size, "fps": fps, "duration": duration, "audio_rate": audio_rate, "gop_seconds": gop_seconds}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def generate_corpus(out_dir: str | Path, n_pretrain: int, n_grounding: int = 0, seed: int = 0, broken: bool = False,
                    *, size: tuple[int, int] | None = None, fps: int | None = None,
                    duration: tuple[float, float] | None = None, audio_rate: int | None = None,
                    gop_seconds: float | None = None, workers: int | None = None) -> CorpusInfo:
    """Write a synthetic corpus to ``out_dir`` (a local folder) and return what was written.

    ``size`` (width, height), ``fps``, ``duration`` (low, high seconds) and ``audio_rate`` force a uniform corpus;
    left None, files follow the default mix (spec.PRETRAIN_MIX / GROUNDING_MIX). ``gop_seconds`` sets the keyframe
    interval (default spec.GOP_SECONDS, like camera files). ``workers`` processes write files in parallel (default:
    one per available core); they are spawned, so a script calling this with workers > 1 needs the usual
    ``if __name__ == "__main__":`` guard. Same arguments => same files, byte for byte.
    """
    start = time.perf_counter()
    overrides = Overrides(size=size, fps=fps, duration=duration, audio_rate=audio_rate, gop_seconds=gop_seconds)
    specs = plan_corpus(n_pretrain, n_grounding, seed, broken, overrides)
    root = Path(out_dir)
    for sub in sorted({Path(s.path).parent for s in specs}):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sizes = _write_all(specs, root, default_workers() if workers is None else workers)
    if n_grounding:
        for split, rel in ANNOTATION_FILES.items():
            lines = _annotation_lines(specs, split)
            _write_text(root / rel, "".join(f"{line}\n" for line in lines))
    records = []
    for s in specs:
        rec = {**s.record(), "bytes": sizes[s.video_id]}
        if s.kind == "broken":
            rec.update(BY_NAME[s.broken].facts())
        records.append(rec)
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "options": corpus_options(size=size, fps=fps, duration=duration, audio_rate=audio_rate,
                                  gop_seconds=gop_seconds),
        "classes": [{"class": k, "colour": class_of(k)[0], "rgb": list(COLOURS[class_of(k)[0]]),
                     "shape": class_of(k)[1], "pitch_hz": class_of(k)[2]} for k in range(N_CLASSES)],
        "annotations": ANNOTATION_FILES if n_grounding else {},
        "videos": records,
    }
    _write_text(root / CORPUS_JSON, json.dumps(manifest, indent=1) + "\n")
    info = CorpusInfo(root, seed, records, wall_s=time.perf_counter() - start)
    log.info("%s", info.summary())
    return info


def load_corpus(out_dir: str | Path) -> CorpusInfo:
    """Read back a generated corpus from its corpus.json."""
    root = Path(out_dir)
    manifest = json.loads((root / CORPUS_JSON).read_text())
    return CorpusInfo(root, manifest["seed"], manifest["videos"])
