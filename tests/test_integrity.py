"""Shards checked against the run's snapshot as they stream: truncated at a member boundary, cut mid-member, a
flipped byte, under both ``on_damage`` policies; the skip share; no loader spins or waits without a bound.

Real shards (``write_shards``, the shard contract), damaged here with ``truncate`` and a byte write. Every test
that expects a failure runs the loader under ``bounded`` and asserts how long it took.

    .venv/bin/python -m pytest tests/test_integrity.py -q
"""

from __future__ import annotations

import itertools
import os
import tarfile
import time

import pytest

from tests.fixtures.bounded import bounded
from tvlt_core.data import DataError, ReadPolicy, StreamingLoader, TvltBatcher, snapshot

DAMAGED = "shard-00001.tar"


def batcher() -> TvltBatcher:
    return TvltBatcher(image_size=32, num_frames=4, patch_size=16, max_audio_frames=64)


def damage(path: str, how: str) -> None:
    """Damage a real tar: cut at the second sample's first header, cut inside a member's data, or flip a byte
    inside the first JPEG's data (same length)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    second = next(m for m in members if m.name.split(".")[0] != members[0].name.split(".")[0])
    if how == "boundary":
        os.truncate(path, second.offset)
    elif how == "mid_member":
        os.truncate(path, second.offset_data + second.size // 2)
    elif how == "flipped":
        with open(path, "r+b") as f:
            f.seek(members[0].offset_data + 100)
            byte = f.read(1)
            f.seek(members[0].offset_data + 100)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        raise ValueError(how)


def epoch(loader: StreamingLoader) -> list[dict]:
    return list(itertools.islice(iter(loader), loader.steps_per_epoch))


@pytest.fixture
def pinned(shard_writer, tmp_path):
    """Three shards of four samples, snapshotted before one is damaged (as a run pins them at its start)."""
    url = shard_writer(tmp_path / "shards", counts=[4, 4, 4])
    return url, snapshot.take(url)


@pytest.mark.parametrize("how, verify, what", [
    ("boundary", "sha256", "bytes, the snapshot says"),
    ("mid_member", "sha256", "bytes, the snapshot says"),
    ("flipped", "sha256", "sha256"),
    ("boundary", "length", "bytes, the snapshot says"),
    ("mid_member", "length", "bytes, the snapshot says"),
])  # fmt: skip
def test_damaged_shard_fails_naming_the_shard_and_what_differed(pinned, how, verify, what):
    url, snap = pinned
    damage(f"{url}/{DAMAGED}", how)
    loader = StreamingLoader(snap, batcher(), batch_size=2, shuffle_buffer=1, policy=ReadPolicy(verify=verify))
    with pytest.raises(DataError, match=rf"shard .*{DAMAGED}: .*{what}.*data\.on_damage is fail"):
        bounded(lambda: epoch(loader), timeout=60)  # re-raises the loader's error once it ended by itself


@pytest.mark.parametrize("how", ["boundary", "mid_member", "flipped"])
def test_skip_policy_skips_the_damaged_shard_and_counts_it(pinned, how):
    url, snap = pinned
    damage(f"{url}/{DAMAGED}", how)
    policy = ReadPolicy(on_damage="skip", max_skip_share=0.5)
    loader = StreamingLoader(snap, batcher(), batch_size=2, shuffle_buffer=1, policy=policy)
    batches, _ = bounded(lambda: epoch(loader), timeout=60)
    good = {k for s in ("shard-00000.tar", "shard-00002.tar") for k in keys_in(f"{url}/{s}")}
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == loader.steps_per_epoch and set(keys) <= good, "no sample of the damaged shard"
    assert set(keys) == good, "every good sample read (the top-up repeats some)"
    assert loader.skipped() == {"samples": 4, "shards": 1}, "counted once, though the top-up passes it again"
    state = loader.state_dict()
    assert state["workers"][0]["skipped_shards"] == 1, "the counts travel with the checkpointed position"


def keys_in(path: str) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar.getmembers()}


def test_a_flipped_byte_passes_length_only_verification_unnoticed_by_the_shard_check(pinned):
    """The cost of verify=length, shown: same length, same count, so the shard check passes; sha256 catches it."""
    url, snap = pinned
    damage(f"{url}/{DAMAGED}", "flipped")
    loader = StreamingLoader(snap, batcher(), batch_size=2, shuffle_buffer=1, policy=ReadPolicy(verify="length"))
    batches, _ = bounded(lambda: epoch(loader), timeout=60)
    assert loader.skipped()["shards"] == 0 and len(batches) == loader.steps_per_epoch


def test_skipping_more_than_the_share_fails_naming_the_setting(pinned):
    url, snap = pinned
    damage(f"{url}/{DAMAGED}", "flipped")
    policy = ReadPolicy(on_damage="skip", max_skip_share=0.2)  # 4 of 12 samples is 0.33
    loader = StreamingLoader(snap, batcher(), batch_size=2, shuffle_buffer=1, policy=policy)
    with pytest.raises(DataError, match=rf"skipped 4 samples .*data\.max_skip_share 0\.2.*{DAMAGED}"):
        bounded(lambda: epoch(loader), timeout=60)


def test_a_shard_rewritten_after_the_snapshot_is_not_read_as_the_pinned_one(shard_writer, tmp_path):
    """An incremental run rewrote a shard in place: the run's snapshot still names the old bytes."""
    url = shard_writer(tmp_path / "shards", counts=[4, 4, 4])
    snap = snapshot.take(url)
    shard_writer(tmp_path / "shards", counts=[4, 5, 4], seed=9)  # same names, other samples
    loader = StreamingLoader(snap, batcher(), batch_size=2, shuffle_buffer=1)
    # every shard holds other bytes now (other seed): whichever the shuffled plan opens first is named
    with pytest.raises(DataError, match=r"shard-0000[0-2]\.tar: (sha256 .*|\d+ bytes), the snapshot says"):
        bounded(lambda: epoch(loader), timeout=60)


class SlowFailing:
    """A task transform for which every sample is wrong and each takes a while to find out (a real batcher's
    prepare, slowed): the loader must give up after ``stall_timeout_s``, not spin through the endless epoch."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def prepare(self, sample, rng):
        time.sleep(self.seconds)
        raise KeyError("queries")  # what TvpBatcher raises on a pretraining sample

    def collate(self, items, rng):
        raise AssertionError("never reached")


def test_no_sample_for_the_stall_timeout_fails_naming_the_shards(pinned):
    url, snap = pinned
    policy = ReadPolicy(max_skip_share=1.0, stall_timeout_s=1.0)  # the share alone would allow 12 failures (3 s)
    loader = StreamingLoader(snap, SlowFailing(0.25), batch_size=2, shuffle_buffer=1, policy=policy)
    with pytest.raises(DataError, match=r"no sample prepared for \d+ s \(data\.stall_timeout_s 1\) while reading .*shard-0000"):
        bounded(lambda: epoch(loader), timeout=30)


class Blocking:
    """A transform that blocks (a read from a hung store looks the same to the training process)."""

    def prepare(self, sample, rng):
        time.sleep(3600)

    def collate(self, items, rng):
        raise AssertionError("never reached")


def test_a_loader_worker_silent_for_the_stall_timeout_fails_the_rank(pinned):
    url, snap = pinned
    loader = StreamingLoader(snap, Blocking(), batch_size=2, num_workers=1, shuffle_buffer=1,
                             policy=ReadPolicy(stall_timeout_s=2.0))  # fmt: skip
    started = time.monotonic()
    with pytest.raises(DataError, match=r"rank 0: no batch from its loader workers for 2 s \(data\.stall_timeout_s\) while reading .*shard-0000"):
        bounded(lambda: epoch(loader), timeout=60)
    assert time.monotonic() - started < 30
