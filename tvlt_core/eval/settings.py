"""The settings of an evaluation and its units of work, shared by the evaluators and the runner.

A unit is one shard of the evaluation set, decided by the manifest alone, so the same data is cut the same way
whether one process or many Ray actors evaluate it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvlt_core import shards


@dataclass(frozen=True)
class EvalSettings:
    """How the evaluation runs; none of it depends on where it runs."""

    batch_size: int = 16  # model inputs per forward pass
    gallery_size: int = 32  # TVLT retrieval: each audio ranks the videos of a gallery of this many clips
    seed: int = 0  # masking noise and random baselines, combined with each sample's key
    random_draws: int = 100  # TVP random-segment baseline: segments drawn per query
    constant_grid: int = 50  # TVP best-constant baseline: start and end searched on a 1/N grid of the duration

    def __post_init__(self):
        if self.batch_size < 1 or self.random_draws < 1:
            raise ValueError("eval.batch_size and eval.random_draws must be >= 1")
        if self.gallery_size < 2:
            raise ValueError(f"eval.gallery_size must be >= 2 (a query needs a wrong candidate), got {self.gallery_size}")
        if self.constant_grid < 2:
            raise ValueError(f"eval.constant_grid must be >= 2, got {self.constant_grid}")


@dataclass(frozen=True)
class EvalParallel:
    """Where the evaluation runs: in this process (``actors: 0``) or on N Ray actors."""

    actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    def __post_init__(self):
        if self.actors < 0 or self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("parallel.actors must be >= 0, parallel.cpus_per_actor > 0, parallel.gpus_per_actor >= 0")


@dataclass(frozen=True)
class EvalUnit:
    """One shard of the evaluation set: the smallest piece of work, the same in every run of the same data."""

    index: int  # position in the manifest
    url: str
    samples: int  # as the manifest counts them



def eval_units(data_url: str) -> list[EvalUnit]:
    """The units of the shard folder (or manifest.json URL) ``data_url``, in manifest order."""
    manifest = shards.load_manifest(data_url)
    urls = shards.shard_urls(data_url, manifest)
    units = [EvalUnit(i, url, entry.samples) for i, (url, entry) in enumerate(zip(urls, manifest.shards))]
    if not units:
        raise ValueError(f"{data_url}: the manifest lists no shards, nothing to evaluate")
    return units


