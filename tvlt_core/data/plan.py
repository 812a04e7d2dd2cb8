"""Which samples each rank and loader worker reads in an epoch, decided from the manifest alone (no I/O).

Every rank computes the same plan from (manifest counts, seed, epoch, world size, workers), so no rank has to
talk to another about data. The rules:

* A *work unit* is one shard, or one of ``parts`` interleaved slices of a shard (samples ``i`` with
  ``i % parts == part``) when there are fewer shards than (ranks x workers): then nobody is left without data.
* Each epoch the units are shuffled with a seed made of (seed, epoch), then dealt to ranks and, inside a rank, to
  loader workers, largest first onto the least loaded reader, so sample counts come out as even as shard sizes
  allow; each reader then reads its units in the shuffled order.
* Steps per epoch are the same on every rank: ``total samples // (world size x batch size)``. A rank whose units
  hold fewer samples than that tops up from the whole epoch's unit list, so uneven shards never make one rank
  wait at a collective for another that has run dry.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkUnit:
    shard: int  # index of the shard in the manifest
    url: str
    part: int  # keep samples i with i % parts == part
    parts: int
    samples: int  # how many samples this unit yields


def seed_for(*parts: object) -> int:
    """A 63-bit seed from any tuple of values, stable across processes and Python versions (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def work_units(urls: Sequence[str], counts: Sequence[int], min_units: int) -> list[WorkUnit]:
    """Cut shards into at least ``min_units`` units (one per shard when there are enough shards)."""
    if len(urls) != len(counts) or not urls:
        raise ValueError(f"need one sample count per shard and at least one shard, got {len(urls)} / {len(counts)}")
    parts = max(1, math.ceil(min_units / len(urls)))
    units = []
    for shard, (url, n) in enumerate(zip(urls, counts)):
        for part in range(parts):
            kept = len(range(part, n, parts))
            if kept:
                units.append(WorkUnit(shard, url, part, parts, kept))
    return units


def deal(units: Sequence[WorkUnit], readers: int) -> list[list[WorkUnit]]:
    """Deal units to ``readers`` bins, largest first onto the lightest bin; each bin keeps the input order."""
    loads = [0] * readers
    bins: list[list[int]] = [[] for _ in range(readers)]
    for i in sorted(range(len(units)), key=lambda i: -units[i].samples):  # stable: ties keep shuffled order
        target = min(range(readers), key=lambda b: (loads[b], b))
        bins[target].append(i)
        loads[target] += units[i].samples
    return [[units[i] for i in sorted(b)] for b in bins]


def steps_per_epoch(total_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank runs per epoch (the remainder of the epoch is dropped, as ``drop_last`` would)."""
    steps = total_samples // (world_size * batch_size)
    if steps < 1:
        raise ValueError(
            f"data.batch_size: {total_samples} samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} ranks; use a smaller batch, fewer workers or more data"
        )
    return steps


def quotas(own_samples: Sequence[int], steps: int, batch_size: int) -> list[int]:
    """Split a rank's ``steps`` batches over its readers in proportion to the samples they hold: whole batches of
    their own first, the rest to the readers with most samples left (those may top up)."""
    quota = [n // batch_size for n in own_samples]
    while sum(quota) > steps:
        quota[max(range(len(quota)), key=lambda i: (quota[i], -i))] -= 1
    while sum(quota) < steps:
        quota[max(range(len(quota)), key=lambda i: (own_samples[i] - quota[i] * batch_size, -i))] += 1
    return quota


@dataclass(frozen=True)
class EpochPlan:
    """What one reader (rank, loader worker) reads in an epoch: its own units, then the whole epoch's list as
    top-up, and how many batches it makes."""

    own: list[WorkUnit]
    all_units: list[WorkUnit]
    quota: int

    @property
    def own_samples(self) -> int:
        return sum(u.samples for u in self.own)

    def stream(self) -> Iterator[WorkUnit | None]:
        """The units to read, in order, without end (the reader stops when its quota is met); ``None`` marks the
        end of each pass, where a shuffle buffer empties before the top-up repeats anything."""
        order = list(self.own)
        while True:
            yield from order
            yield None
            order = self.all_units  # top-up: a reader short of samples continues over every unit of the epoch


def epoch_plans(
    units: Sequence[WorkUnit], *, seed: int, epoch: int, rank: int, world_size: int, num_workers: int,
    steps: int, batch_size: int,
) -> list[EpochPlan]:  # fmt: skip
    """One ``EpochPlan`` per loader worker of ``rank``; every process computes the same plans."""
    shuffled = list(units)
    random.Random(seed_for(seed, epoch)).shuffle(shuffled)
    per_worker = deal(deal(shuffled, world_size)[rank], num_workers)
    quota = quotas([sum(u.samples for u in own) for own in per_worker], steps, batch_size)
    plans = []
    for worker, own in enumerate(per_worker):
        # the top-up starts at a different place for each reader so short readers do not all repeat the same samples
        offset = (rank * num_workers + worker) * len(shuffled) // (world_size * num_workers)
        plans.append(EpochPlan(own=own, all_units=shuffled[offset:] + shuffled[:offset], quota=quota[worker]))
    return plans
