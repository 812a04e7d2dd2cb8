"""Streaming WebDataset loader: named stages, the same number of steps on every rank, a resumable position.

The pipeline, as named stages (the order open_clip uses)::

    shard list       manifest.json -> work units with sample counts             plan.work_units
    epoch shuffle    units shuffled by (seed, epoch)                            plan.epoch_plan
    split by rank    units dealt to ranks by sample count                       plan.epoch_plan
    split by worker  a rank's units dealt to its loader workers                 plan.epoch_plan
    read             tar stream (local or any fsspec URL) -> raw samples,       read_units
                     each shard verified against the snapshot
    shuffle          a buffer of raw samples                                    shuffle_buffer
    decode           JPEG/npy/JSON -> arrays, then the task's sample transform  decode (bad samples: skip, count)
    batch            the task's collate: tensors with padding masks             Batcher.collate

Integrity (``ReadPolicy``). Every shard is checked against its snapshot entry as it is read: its length before
the first sample (a truncated shard is found before it yields anything), its sample count at its end, and with
``verify="sha256"`` its sha256 before the first sample (the shard is read into memory once, hashed, then parsed:
one shard per loader worker in memory, the writer's ``shards.target_bytes`` at most). An unreadable tar counts as
damage too. ``on_damage="fail"`` raises ``DataError`` naming the shard and what differed; ``"skip"`` skips the
shard and counts its samples. Samples that fail to decode are skipped and counted under either policy. A reader
that skips more than ``max_skip_share`` of its epoch's samples raises; one that prepares no sample for
``stall_timeout_s`` raises ``DataError`` naming the shards it was reading (with loader worker processes the
training process also gives up on a worker silent that long), so no loader spins or waits without end.

Position. Every batch carries the state of the worker that made it, taken right after making it: batches made,
samples read, the ordinals of the samples waiting in its shuffle buffer and its random generator's state. The
loader keeps the state of the last batch it handed out, so ``state_dict()`` describes exactly what was consumed.
A resume re-reads the buffered samples by ordinal, restores the generator and goes on reading where the worker
stopped: the resumed epoch yields the very batches the uninterrupted one would have, neither repeating nor
skipping a sample. Nothing is decoded to get there: whole units are skipped by their manifest counts, and only
the few units that hold buffered samples are read again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import random
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import fsspec
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from tvlt_core import shards
from tvlt_core.data import plan, snapshot
from tvlt_core.data.snapshot import DataSnapshot

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
    skipped_samples: int = 0  # this epoch, so far: damaged shards' samples and samples that failed to decode
    skipped_shards: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerPosition:
        return cls(int(data["batches"]), int(data["read"]), [int(o) for o in data["buffer"]], data["rng"],
                   int(data.get("skipped_samples", 0)), int(data.get("skipped_shards", 0)))  # fmt: skip


@dataclass(frozen=True)
class Tagged:
    """A batch with the position of the worker that made it."""

    worker: int
    position: WorkerPosition
    batch: dict[str, Any]


class DataError(RuntimeError):
    """The data cannot be trained on as configured: a damaged shard under ``on_damage="fail"``, too many samples
    skipped, or no sample for ``stall_timeout_s``. Deterministic: reading again reads the same bytes."""


@dataclass(frozen=True)
class ReadPolicy:
    """How shards are verified and what a mismatch does (``DataConfig`` fills it from ``data.*``)."""

    verify: Literal["sha256", "length", "off"] = "sha256"  # off: benchmarks only (length and count unchecked)
    on_damage: Literal["fail", "skip"] = "fail"
    max_skip_share: float = 0.05  # of a reader's samples in an epoch; more skipped fails the rank
    stall_timeout_s: float = 300.0  # no sample prepared for this long fails the rank

    def __post_init__(self):
        if not 0 <= self.max_skip_share <= 1:
            raise ValueError(f"data.max_skip_share must be in [0, 1], got {self.max_skip_share}")
        if self.stall_timeout_s <= 0:
            raise ValueError(f"data.stall_timeout_s must be > 0, got {self.stall_timeout_s}")


class ShardDamaged(Exception):
    """A shard differs from its snapshot entry; ``what`` says how."""

    def __init__(self, url: str, what: str):
        super().__init__(f"shard {url}: {what}")
        self.url, self.what = url, what


@dataclass
class Health:
    """One reader's skips in the current epoch and the time of its last good sample; raises by the policy."""

    policy: ReadPolicy
    budget: int  # samples it may skip this epoch
    where: str  # "rank R worker W", for messages
    skipped_samples: int = 0
    skipped_shards: int = 0
    damaged: list[str] = field(default_factory=list)  # "url: what" of every skipped shard
    skipped_urls: set[str] = field(default_factory=set)  # not opened again (a top-up pass would count it twice)
    failing: set[str] = field(default_factory=set)  # shards whose samples failed since the last good one
    last_good: float = field(default_factory=time.monotonic)

    def shard_damaged(self, err: ShardDamaged, lost: int) -> None:
        if self.policy.on_damage == "fail":
            raise DataError(f"{self.where}: {err} (data.on_damage is fail; skip would skip the shard and count it)")
        log.warning("%s: skipping %s (%d samples)", self.where, err, lost)
        self.skipped_urls.add(err.url)
        self.skipped_shards += 1
        self.damaged.append(str(err))
        self._lost(lost, err.url)

    def sample_failed(self, key: str, url: str, err: Exception) -> None:
        log.warning("%s: skipping sample %s of %s: %s", self.where, key, url, err)
        self.failing.add(url)
        self._lost(1, url)

    def sample_ok(self) -> None:
        self.last_good, self.failing = time.monotonic(), set()

    def _lost(self, n: int, url: str) -> None:
        self.skipped_samples += n
        if self.skipped_samples > self.budget:
            raise DataError(
                f"{self.where}: skipped {self.skipped_samples} samples this epoch, more than data.max_skip_share "
                f"{self.policy.max_skip_share} of its samples allows ({self.budget}); last from {url}; damaged "
                f"shards: {self.damaged or 'none'}"
            )
        self.check_stall(url)

    def check_stall(self, url: str) -> None:
        waited = time.monotonic() - self.last_good
        if waited > self.policy.stall_timeout_s:
            reading = sorted(self.failing | {url})
            raise DataError(
                f"{self.where}: no sample prepared for {waited:.0f} s (data.stall_timeout_s "
                f"{self.policy.stall_timeout_s:g}) while reading {reading}; do the shards fit this task?"
            )


# --- stages ----------------------------------------------------------------------------------------------------------
def _tar_samples(url: str, stream) -> Iterator[dict[str, Any]]:
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    except (tarfile.TarError, OSError, EOFError) as err:  # a tar cut mid-member, or garbage inside
        raise ShardDamaged(url, f"unreadable tar ({type(err).__name__}: {err})") from err


def read_shard(url: str, entry: shards.ShardEntry | None = None, verify: str = "off") -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", ext: bytes}``) of one tar shard, streamed from a local path or fsspec URL.

    With ``entry`` and ``verify`` "length" or "sha256", the shard is checked against it first (``ShardDamaged``
    before any sample) and its sample count at the end; "off" reads without any check."""
    if entry is None or verify == "off":
        with fsspec.open(url, "rb") as stream:
            yield from _tar_samples(url, stream)
        return
    fs, path = fsspec.core.url_to_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError as err:
        raise ShardDamaged(url, "missing (the snapshot lists it)") from err
    if size != entry.bytes:
        raise ShardDamaged(url, f"{size} bytes, the snapshot says {entry.bytes}")
    with fs.open(path, "rb") as f:
        if verify == "sha256" and entry.sha256:
            data = f.read()
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry.sha256:
                raise ShardDamaged(url, f"sha256 {digest[:16]}..., the snapshot says {entry.sha256[:16]}...")
            f = io.BytesIO(data)
        count = 0
        for count, sample in enumerate(_tar_samples(url, f), 1):
            yield sample
    if count != entry.samples:
        raise ShardDamaged(url, f"{count} samples, the snapshot says {entry.samples}")


def unit_samples(unit: plan.WorkUnit, wanted: Callable[[int], bool] = lambda i: True, *,
                 entry: shards.ShardEntry | None = None, health: Health | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The samples of one unit (its slice of a shard) whose index inside the unit ``wanted`` accepts. A damaged
    shard goes to ``health`` (fail or skip); without one it raises ``ShardDamaged``."""
    index = 0
    verify = health.policy.verify if health is not None else "off"
    if health is not None and unit.url in health.skipped_urls:
        return
    try:
        for i, sample in enumerate(read_shard(unit.url, entry, verify)):
            if i % unit.parts == unit.part:
                if wanted(index):
                    yield sample
                index += 1
    except ShardDamaged as err:
        if health is None:
            raise
        health.shard_damaged(err, unit.samples - index)


def read_units(units: Iterator[plan.WorkUnit | None], start: int, entries: list[shards.ShardEntry] | None = None,
               health: Health | None = None) -> Iterator[tuple[int, dict[str, Any]] | None]:  # fmt: skip
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
            entry = entries[unit.shard] if entries is not None else None
            lo = max(first, start)
            for ordinal, sample in enumerate(unit_samples(unit, lambda i: first + i >= start, entry=entry, health=health), lo):
                yield ordinal, sample
            idle = 0 if ordinal >= lo else idle + 1
            if idle > 1000:
                raise DataError(f"1000 units in a row gave no sample (last: {unit.url}); are the shards empty?")
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


def decode(samples: Iterator[dict[str, Any]], batcher: Batcher, rng: random.Random,
           health: Health | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Decode and transform; a sample that fails is logged with its key and shard, skipped and counted."""
    for raw in samples:
        try:
            item = batcher.prepare(shards.decode_sample(raw), rng)
        except (ValueError, KeyError, OSError) as err:  # corrupt JPEG/npy/JSON or a missing entry
            if health is None:
                log.warning("skipping sample %s of %s: %s", raw.get("__key__"), raw.get("__url__"), err)
            else:
                health.sample_failed(str(raw.get("__key__")), str(raw.get("__url__")), err)
            continue
        if health is not None:
            health.sample_ok()
        yield item


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
        health = Health(ld.policy, int(ld.policy.max_skip_share * epoch_plan.own_samples),
                        f"rank {ld.rank} loader worker {worker}", start.skipped_samples, start.skipped_shards)  # fmt: skip
        rng = random.Random(plan.seed_for(ld.seed, self.epoch, ld.rank, worker))
        if start.rng is not None:
            rng.setstate((start.rng[0], tuple(start.rng[1]), start.rng[2]))
        refill = read_ordinals(epoch_plan.stream(), start.buffer) if start.buffer else {}
        buffer = ShuffleBuffer(ld.shuffle_buffer, rng, [(o, refill[o]) for o in start.buffer])
        reader = read_units(epoch_plan.stream(), start.read, ld.snapshot.shards, health)
        next_ordinal = start.read

        def counted() -> Iterator[tuple[int, dict[str, Any]] | None]:
            nonlocal next_ordinal
            for item in reader:
                if item is not None:
                    next_ordinal = item[0] + 1
                yield item

        samples = decode(buffer(counted()), ld.batcher, rng, health)
        for made in range(start.batches + 1, epoch_plan.quota + 1):
            batch = ld.batcher.collate([next(samples) for _ in range(ld.batch_size)], rng)
            state = rng.getstate()
            position = WorkerPosition(made, next_ordinal, [o for o, _ in buffer.items], [state[0], list(state[1]), state[2]],
                                      health.skipped_samples, health.skipped_shards)  # fmt: skip
            yield Tagged(worker, position, batch)


class StreamingLoader:
    """Endless batches over the shards of a data snapshot, epoch after epoch, for one rank.

    Args:
        data: the run's ``DataSnapshot``, or a folder / ``manifest.json`` URL (local path, ``s3://...``, any fsspec
            URL) whose live manifest is snapshotted now.
        batcher: the task's sample transform and collate (see ``tvlt_core.data.batches``).
        batch_size: samples per batch on this rank.
        rank, world_size: this rank among the data-parallel ranks (passed in; no process group needed).
        num_workers: loader worker processes (0 = read in this process).
        seed: shuffling seed, the same on every rank.
        shuffle_buffer: raw samples held for shuffling per worker (1 = keep shard order).
        policy: verification and what damage does (``ReadPolicy``).

    ``steps_per_epoch`` is the same on every rank; ``state_dict()`` / ``load_state_dict()`` carry the position.
    """

    def __init__(
        self,
        data: str | DataSnapshot,
        batcher: Batcher,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 64,
        policy: ReadPolicy | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1 or shuffle_buffer < 1 or num_workers < 0:
            raise ValueError("batch_size and shuffle_buffer must be >= 1 and num_workers >= 0")
        self.snapshot = data if isinstance(data, DataSnapshot) else snapshot.take(data)
        self.policy = policy or ReadPolicy()
        self.batcher, self.batch_size, self.seed = batcher, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer = shuffle_buffer
        self.num_readers = max(1, num_workers)
        counts = [s.samples for s in self.snapshot.shards]
        self.units = plan.work_units(self.snapshot.urls(), counts, world_size * self.num_readers)
        self.steps_per_epoch = plan.steps_per_epoch(self.snapshot.num_samples, world_size, batch_size)
        self.epoch = 0
        self._positions = [WorkerPosition() for _ in range(self.num_readers)]
        self._skipped_before = {"samples": 0, "shards": 0}  # in earlier epochs of this run

    def plans(self, epoch: int) -> list[plan.EpochPlan]:
        """What each loader worker of this rank reads in ``epoch``."""
        return plan.epoch_plans(
            self.units, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
            num_workers=self.num_readers, steps=self.steps_per_epoch, batch_size=self.batch_size,
        )  # fmt: skip

    @property
    def num_samples(self) -> int:
        return self.snapshot.num_samples

    @property
    def step_in_epoch(self) -> int:
        return sum(p.batches for p in self._positions)

    def skipped(self) -> dict[str, int]:
        """Samples and shards this rank skipped so far in the run (as of the last batch handed out)."""
        return {"samples": self._skipped_before["samples"] + sum(p.skipped_samples for p in self._positions),
                "shards": self._skipped_before["shards"] + sum(p.skipped_shards for p in self._positions)}  # fmt: skip

    def reading(self) -> list[str]:
        """The shards this rank's readers are in now (for messages)."""
        found = set()
        for p, epoch_plan in zip(self._positions, self.plans(self.epoch)):
            first = 0
            for unit in epoch_plan.stream():
                if unit is None:
                    continue
                if first + unit.samples > p.read:
                    found.add(unit.url)
                    break
                first += unit.samples
        return sorted(found)

    def _epoch_batches(self) -> Iterator[Tagged]:
        start = [dataclasses.replace(p) for p in self._positions]
        loader = DataLoader(
            _EpochStream(self, self.epoch, start),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            # a worker blocked in a read (a hung store) must not hold the rank for ever
            timeout=self.policy.stall_timeout_s if self.num_workers else 0,
            # its own generator: drawing worker seeds from the global one would shift the model's random
            # stream (masking noise) by one draw per epoch started, and a resumed run would diverge
            generator=torch.Generator().manual_seed(plan.seed_for(self.seed, self.epoch, self.rank)),
        )
        try:
            yield from loader
        except RuntimeError as err:
            if "timed out" not in str(err) or isinstance(err, DataError):
                raise
            raise DataError(
                f"rank {self.rank}: no batch from its loader workers for {self.policy.stall_timeout_s:g} s "
                f"(data.stall_timeout_s) while reading {self.reading()}"
            ) from err

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            if self.step_in_epoch < self.steps_per_epoch:  # (a resume at the end of an epoch skips it)
                for tagged in self._epoch_batches():
                    self._positions[tagged.worker] = tagged.position
                    yield tagged.batch
            if self.step_in_epoch < self.steps_per_epoch:
                raise RuntimeError(
                    f"rank {self.rank}: epoch {self.epoch} ended after {self.step_in_epoch} of "
                    f"{self.steps_per_epoch} batches"
                )
            self._skipped_before = self.skipped()
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
            "generation": self.snapshot.generation,
            "num_samples": self.snapshot.num_samples,
            "digest": self.snapshot.digest,
            "skipped_before": dict(self._skipped_before),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. With another plan (world size, workers, batch, seed, or another data snapshot:
        ``data.refresh``) the saved positions mean nothing here: the loader then starts the saved epoch afresh,
        and says so."""
        self.epoch = int(state["epoch"])
        self._skipped_before = {k: int(v) for k, v in state.get("skipped_before", self._skipped_before).items()}
        same_data = state.get("digest", self.snapshot.digest) == self.snapshot.digest
        same_plan = (
            len(state["workers"]) == self.num_readers
            and all(state.get(k) == getattr(self, k) for k in ("rank", "world_size", "seed", "batch_size"))
            and state.get("num_samples") == self.snapshot.num_samples
            and same_data
        )
        if same_plan:
            self._positions = [WorkerPosition.from_json(w) for w in state["workers"]]
        elif not same_data:
            log.warning("loader state is from data snapshot %s, the run now reads %s (data.refresh): restarting "
                        "epoch %d from its start", state.get("digest"), self.snapshot.digest, self.epoch)  # fmt: skip
            self._positions = [WorkerPosition() for _ in range(self.num_readers)]
        else:
            log.warning("loader state is from another data plan; restarting epoch %d from its start", self.epoch)
            self._positions = [WorkerPosition() for _ in range(self.num_readers)]
