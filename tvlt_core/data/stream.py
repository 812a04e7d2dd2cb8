"""Streaming WebDataset loader: named stages, the same number of steps on every rank, a resumable position.

The pipeline, as named stages (the order open_clip uses)::

    shard list       manifest.json -> work units with sample counts             plan.work_units
    epoch shuffle    units shuffled by (seed, epoch)                            plan.epoch_plan
    split by rank    units dealt to ranks by sample count                       plan.epoch_plan
    split by worker  a rank's units dealt to its loader workers                 plan.epoch_plan
    read             tar stream (local or any fsspec URL) -> raw samples        read_units
    shuffle          a buffer of raw samples                                    shuffle_buffer
    decode           JPEG/npy/JSON -> arrays, then the task's sample transform  decode (bad samples: skip and log)
    batch            the task's collate: tensors with padding masks             Batcher.collate

Position. Every batch carries the state of the worker that made it, taken right after making it: batches made,
samples read, the ordinals of the samples waiting in its shuffle buffer and its random generator's state. The
loader keeps the state of the last batch it handed out, so ``state_dict()`` describes exactly what was consumed.
A resume re-reads the buffered samples by ordinal, restores the generator and goes on reading where the worker
stopped: the resumed epoch yields the very batches the uninterrupted one would have, neither repeating nor
skipping a sample. Nothing is decoded to get there: whole units are skipped by their manifest counts, and only
the few units that hold buffered samples are read again.
"""

from __future__ import annotations

import logging
import random
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import fsspec
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from tvlt_core import shards
from tvlt_core.data import plan

log = logging.getLogger(__name__)


class Batcher(Protocol):
    """What a task adds to the loader: one decoded sample -> model-ready parts, a list of them -> a batch."""

    def prepare(self, sample: shards.DecodedSample, rng: random.Random) -> dict[str, Any]: ...

    def collate(self, items: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]: ...


@dataclass
class WorkerPosition:
    """Where one loader worker is in its epoch; plain ints and lists, so it goes into JSON as is."""

    batches: int = 0  # batches handed out this epoch
    read: int = 0  # ordinal of the next sample to read from its unit stream
    buffer: list[int] = field(default_factory=list)  # ordinals of the samples in its shuffle buffer, in order
    rng: list[int] | None = None  # random.Random state (None: a fresh epoch, seeded from the plan)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerPosition:
        return cls(int(data["batches"]), int(data["read"]), [int(o) for o in data["buffer"]], data["rng"])


@dataclass(frozen=True)
class Tagged:
    """A batch with the position of the worker that made it."""

    worker: int
    position: WorkerPosition
    batch: dict[str, Any]


# --- stages ----------------------------------------------------------------------------------------------------------
def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", ext: bytes}``) of one tar shard, streamed from a local path or fsspec URL."""
    with fsspec.open(url, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def unit_samples(unit: plan.WorkUnit, wanted: Callable[[int], bool] = lambda i: True) -> Iterator[dict[str, Any]]:
    """The samples of one unit (its slice of a shard) whose index inside the unit ``wanted`` accepts."""
    index = 0
    for i, sample in enumerate(read_shard(unit.url)):
        if i % unit.parts == unit.part:
            if wanted(index):
                yield sample
            index += 1


def read_units(units: Iterator[plan.WorkUnit | None], start: int) -> Iterator[tuple[int, dict[str, Any]] | None]:
    """(ordinal, sample) of the endless unit stream from ordinal ``start`` on, and ``None`` at the end of each
    pass; whole units before ``start`` are skipped by their manifest counts without being opened."""
    first = 0  # ordinal of the current unit's first sample
    idle = 0  # units in a row that gave nothing: the shards do not hold what the manifest says
    for unit in units:
        if unit is None:
            # the end of a pass empties the buffer; resumed exactly there (the buffer maybe not yet emptied), it
            # is passed on again: emptying an already empty buffer changes nothing
            if first >= start:
                yield None
            continue
        if first + unit.samples > start:
            ordinal = first - 1
            for ordinal, sample in enumerate(unit_samples(unit, lambda i: first + i >= start), max(first, start)):
                yield ordinal, sample
            idle = 0 if ordinal >= max(first, start) else idle + 1
            if idle > 1000:
                raise RuntimeError(f"1000 units in a row gave no sample (last: {unit.url}); are the shards empty?")
        first += unit.samples


def read_ordinals(units: Iterator[plan.WorkUnit | None], ordinals: list[int]) -> dict[int, dict[str, Any]]:
    """The samples at ``ordinals`` of the unit stream (to refill a shuffle buffer); opens only units holding one."""
    found: dict[int, dict[str, Any]] = {}
    wanted, first = set(ordinals), 0
    for unit in units:
        if len(found) == len(wanted):
            break
        if unit is None:
            continue
        inside = {o - first for o in wanted if first <= o < first + unit.samples}
        if inside:
            for o, sample in zip(sorted(inside), unit_samples(unit, inside.__contains__)):
                found[first + o] = sample
        first += unit.samples
    return found


class ShuffleBuffer:
    """Yields samples in random order through a buffer of ``size`` (1 = stream order); a ``None`` in the input
    (end of a pass over the units) empties the buffer first.

    Between two yields every sample read so far is either handed out or in ``items``; that is what makes the
    buffer's contents a valid part of a checkpoint.
    """

    def __init__(self, size: int, rng: random.Random, items: list[tuple[int, dict[str, Any]]] | None = None):
        self.size, self.rng, self.items = size, rng, list(items or [])

    def __call__(self, samples: Iterator[tuple[int, dict[str, Any]] | None]) -> Iterator[dict[str, Any]]:
        for item in samples:
            if item is None:
                yield from self._drain()
            elif len(self.items) < self.size:
                self.items.append(item)
            else:
                j = self.rng.randrange(self.size)
                (_, out), self.items[j] = self.items[j], item
                yield out
        yield from self._drain()

    def _drain(self) -> Iterator[dict[str, Any]]:
        while self.items:
            yield self.items.pop(self.rng.randrange(len(self.items)))[1]


def decode(samples: Iterator[dict[str, Any]], batcher: Batcher, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Decode and transform; a sample that fails is logged with its key and shard, and skipped."""
    for raw in samples:
        try:
            yield batcher.prepare(shards.decode_sample(raw), rng)
        except (ValueError, KeyError, OSError) as err:  # corrupt JPEG/npy/JSON or a missing entry
            log.warning("skipping sample %s of %s: %s", raw.get("__key__"), raw.get("__url__"), err)


# --- one epoch of one rank, split over loader workers -----------------------------------------------------------------
class _EpochStream(IterableDataset):
    def __init__(self, loader: StreamingLoader, epoch: int, start: list[WorkerPosition]):
        super().__init__()
        self.loader, self.epoch, self.start = loader, epoch, start

    def __iter__(self) -> Iterator[Tagged]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        ld, start = self.loader, self.start[worker]
        epoch_plan = ld.plans(self.epoch)[worker]
        if start.batches >= epoch_plan.quota:
            return
        rng = random.Random(plan.seed_for(ld.seed, self.epoch, ld.rank, worker))
        if start.rng is not None:
            rng.setstate((start.rng[0], tuple(start.rng[1]), start.rng[2]))
        refill = read_ordinals(epoch_plan.stream(), start.buffer) if start.buffer else {}
        buffer = ShuffleBuffer(ld.shuffle_buffer, rng, [(o, refill[o]) for o in start.buffer])
        reader = read_units(epoch_plan.stream(), start.read)
        next_ordinal = start.read

        def counted() -> Iterator[tuple[int, dict[str, Any]] | None]:
            nonlocal next_ordinal
            for item in reader:
                if item is not None:
                    next_ordinal = item[0] + 1
                yield item

        samples = decode(buffer(counted()), ld.batcher, rng)
        for made in range(start.batches + 1, epoch_plan.quota + 1):
            batch = ld.batcher.collate([next(samples) for _ in range(ld.batch_size)], rng)
            state = rng.getstate()
            position = WorkerPosition(made, next_ordinal, [o for o, _ in buffer.items], [state[0], list(state[1]), state[2]])
            yield Tagged(worker, position, batch)


class StreamingLoader:
    """Endless batches over the shards of a manifest, epoch after epoch, for one rank.

    Args:
        manifest_url: folder or ``manifest.json`` URL (local path, ``s3://...``, any fsspec URL).
        batcher: the task's sample transform and collate (see ``tvlt_core.data.batches``).
        batch_size: samples per batch on this rank.
        rank, world_size: this rank among the data-parallel ranks (passed in; no process group needed).
        num_workers: loader worker processes (0 = read in this process).
        seed: shuffling seed, the same on every rank.
        shuffle_buffer: raw samples held for shuffling per worker (1 = keep shard order).

    ``steps_per_epoch`` is the same on every rank; ``state_dict()`` / ``load_state_dict()`` carry the position.
    """

    def __init__(
        self,
        manifest_url: str,
        batcher: Batcher,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 64,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1 or shuffle_buffer < 1 or num_workers < 0:
            raise ValueError("batch_size and shuffle_buffer must be >= 1 and num_workers >= 0")
        self.manifest = shards.load_manifest(manifest_url)
        self.manifest_url = manifest_url
        self.batcher, self.batch_size, self.seed = batcher, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer = shuffle_buffer
        self.num_readers = max(1, num_workers)
        urls = shards.shard_urls(manifest_url, self.manifest)
        self.units = plan.work_units(urls, [s.samples for s in self.manifest.shards], world_size * self.num_readers)
        self.steps_per_epoch = plan.steps_per_epoch(self.manifest.num_samples, world_size, batch_size)
        self.epoch = 0
        self._positions = [WorkerPosition() for _ in range(self.num_readers)]

    def plans(self, epoch: int) -> list[plan.EpochPlan]:
        """What each loader worker of this rank reads in ``epoch``."""
        return plan.epoch_plans(
            self.units, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
            num_workers=self.num_readers, steps=self.steps_per_epoch, batch_size=self.batch_size,
        )  # fmt: skip

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def step_in_epoch(self) -> int:
        return sum(p.batches for p in self._positions)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            if self.step_in_epoch < self.steps_per_epoch:  # (a resume at the end of an epoch skips it)
                start = [dataclasses.replace(p) for p in self._positions]
                loader = DataLoader(
                    _EpochStream(self, self.epoch, start),
                    batch_size=None,
                    num_workers=self.num_workers,
                    pin_memory=torch.cuda.is_available(),
                    persistent_workers=False,
                    # its own generator: drawing worker seeds from the global one would shift the model's random
                    # stream (masking noise) by one draw per epoch started, and a resumed run would diverge
                    generator=torch.Generator().manual_seed(plan.seed_for(self.seed, self.epoch, self.rank)),
                )
                for tagged in loader:
                    self._positions[tagged.worker] = tagged.position
                    yield tagged.batch
            if self.step_in_epoch < self.steps_per_epoch:
                raise RuntimeError(
                    f"rank {self.rank}: epoch {self.epoch} ended after {self.step_in_epoch} of "
                    f"{self.steps_per_epoch} batches"
                )
            self.epoch += 1
            self._positions = [WorkerPosition() for _ in range(self.num_readers)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: epoch and, per worker, batches handed out and samples read."""
        return {
            "epoch": self.epoch,
            "workers": [p.to_json() for p in self._positions],
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "generation": self.manifest.generation,
            "num_samples": self.manifest.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. With another plan (world size, workers, batch, seed or shards) the saved
        positions mean nothing here: the loader then starts the saved epoch afresh, and says so."""
        self.epoch = int(state["epoch"])
        same_plan = (
            len(state["workers"]) == self.num_readers
            and all(state.get(k) == getattr(self, k) for k in ("rank", "world_size", "seed", "batch_size"))
            and state.get("num_samples") == self.manifest.num_samples
        )
        if same_plan:
            self._positions = [WorkerPosition.from_json(w) for w in state["workers"]]
        else:
            log.warning("loader state is from another data plan; restarting epoch %d from its start", self.epoch)
            self._positions = [WorkerPosition() for _ in range(self.num_readers)]
