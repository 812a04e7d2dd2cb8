"""The streaming loader: every rank runs the same steps on uneven shards, epochs reshuffle, the position resumes
without repeating data, TVLT batches carry padding masks and matching pairs, shards on s3:// read the same."""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections import Counter

import numpy as np
import pytest
import torch

from tvlt_core.data import ReadPolicy, StreamingLoader, TvltBatcher, TvpBatcher
from tvlt_core.data import plan

FRAMES, SIZE = 4, 32


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the session's moto S3 server; s3fs finds it through the usual AWS_* environment."""
    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("loader-test")
    yield "s3://loader-test"
    s3fs.S3FileSystem.clear_instance_cache()


def make_batcher(**kw) -> TvltBatcher:
    return TvltBatcher(image_size=SIZE, num_frames=FRAMES, patch_size=16, max_audio_frames=64, **kw)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def run(loader: StreamingLoader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


# --- plan (pure) -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counts, world, workers", [([5, 5, 5, 5], 2, 1), ([7, 1, 3], 2, 2), ([9], 3, 1), ([2, 0, 11, 4, 4], 2, 2)])
def test_plan_covers_every_sample_once_and_balances(counts, world, workers):
    urls = [f"s{i}.tar" for i in range(len(counts))]
    units = plan.work_units(urls, counts, world * workers)
    covered = Counter()
    for u in units:
        covered.update((u.shard, i) for i in range(u.part, counts[u.shard], u.parts))
    assert sorted(covered) == [(s, i) for s, n in enumerate(counts) for i in range(n)]
    assert set(covered.values()) == {1}
    loads, steps = [], plan.steps_per_epoch(sum(counts), world, 2)
    for rank in range(world):
        plans = plan.epoch_plans(units, seed=1, epoch=3, rank=rank, world_size=world, num_workers=workers, steps=steps, batch_size=2)
        assert sum(p.quota for p in plans) == steps, "every rank makes the same number of batches"
        for p in plans:
            loads.append(p.own_samples)
            assert p.quota * 2 <= p.own_samples + 2, "a reader's batches follow the samples it holds"
    assert sum(loads) == sum(counts)
    assert max(loads) - min(loads) <= max(u.samples for u in units)


def test_epoch_shuffle_is_seeded_by_epoch():
    units = plan.work_units([f"s{i}" for i in range(8)], [3] * 8, 2)

    def order(epoch):
        plans = plan.epoch_plans(units, seed=0, epoch=epoch, rank=0, world_size=1, num_workers=1, steps=8, batch_size=3)
        return [u.shard for u in plans[0].own]

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))


def test_too_little_data_names_the_setting():
    with pytest.raises(ValueError, match="data.batch_size"):
        plan.steps_per_epoch(total_samples=3, world_size=2, batch_size=2)


# --- loader over real tar shards -----------------------------------------------------------------------------------
def test_uneven_shards_give_every_rank_the_same_steps(shard_writer, tmp_path):
    url = shard_writer(tmp_path / "uneven", counts=[7, 1, 3, 2])  # 13 samples, world 2, batch 2 -> 3 steps
    per_rank = []
    for rank in range(2):
        loader = StreamingLoader(url, make_batcher(), batch_size=2, rank=rank, world_size=2, shuffle_buffer=4)
        assert loader.steps_per_epoch == 3
        batches = run(loader, loader.steps_per_epoch)
        assert loader.step_in_epoch == 3 and loader.epoch == 0
        per_rank.append(keys_of(batches))
        next_epoch = run(loader, 1)  # the stream goes on into epoch 1 instead of ending
        assert loader.epoch == 1 and len(next_epoch) == 1
    assert all(len(k) == 6 for k in per_rank)
    assert len(set(per_rank[0] + per_rank[1])) >= 10  # balanced by counts: little overlap between the ranks


def test_epochs_reshuffle(shard_writer, tmp_path):
    url = shard_writer(tmp_path / "s", counts=[4, 4, 4])
    loader = StreamingLoader(url, make_batcher(), batch_size=3, shuffle_buffer=6, seed=5)
    epoch0, epoch1 = keys_of(run(loader, 4)), keys_of(run(loader, 4))
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 12
    assert epoch0 != epoch1


@pytest.mark.parametrize("num_workers, buffer", [(0, 1), (0, 5), (2, 3)])
def test_resume_yields_the_uninterrupted_epoch(shard_writer, tmp_path, num_workers, buffer):
    url = shard_writer(tmp_path / "s", counts=[6, 4, 8])  # 18 samples, batch 2 -> 9 steps per epoch
    make = lambda: StreamingLoader(url, make_batcher(), batch_size=2, num_workers=num_workers, shuffle_buffer=buffer)  # noqa: E731
    full = run(make(), 9)
    first = make()
    before = run(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # it goes into checkpoints as JSON
    resumed = make()
    resumed.load_state_dict(state)
    after = run(resumed, 5)
    assert resumed.epoch == 0 and resumed.step_in_epoch == 9
    seen = keys_of(before + after)
    assert len(seen) == len(set(seen)) == 18, "no sample repeated or skipped"
    if num_workers == 0:  # one reader: the very same batches, matching pairs included
        assert seen == keys_of(full)
        for a, b in zip(before + after, full):
            torch.testing.assert_close(a["labels"], b["labels"])
    else:  # the DataLoader restarts its round robin at worker 0, so batches may come in another order
        assert sorted(map(tuple, (b["keys"] for b in before + after))) == sorted(map(tuple, (b["keys"] for b in full)))
    assert keys_of(run(resumed, 9)) == keys_of(run(make(), 18)[9:]), "and the next epoch is unaffected"


def test_tvlt_batches_have_padding_masks_and_matching_pairs(shard_writer, tmp_path):
    url = shard_writer(tmp_path / "s", counts=[8], mel_lengths=[20, 40, 64, 100], silent_every=3)
    loader = StreamingLoader(url, make_batcher(mismatch_prob=0.5), batch_size=8, shuffle_buffer=1)
    batch = run(loader, 1)[0]
    b = 8
    assert batch["pixel_values"].shape == (b, FRAMES, 3, SIZE, SIZE)
    assert batch["pixel_mask"].shape == (b, FRAMES * (SIZE // 16) ** 2) and batch["pixel_mask"].all()
    values, mask = batch["audio_values"], batch["audio_mask"]
    assert values.shape == (b, 1, 64, 128) and mask.shape == (b, 64 // 16 * 8)
    lengths = [min(64, [20, 40, 64, 100][i % 4]) for i in range(b)]
    for i, n in enumerate(lengths):
        if i % 3 == 0:  # a clip without audio: silence, masked off entirely
            assert mask[i].sum() == 0 and (values[i, 0, :16] == -1).all()
            continue
        assert mask[i].sum() == -(-n // 16) * 8
        assert (values[i, 0, n:] == 0).all() and (values[i, 0, :n] != 0).any()
    labels, mixed = batch["labels"], batch["pixel_values_mixed"]
    assert labels.shape == (b, 1) and 0 < labels.sum() < b  # with 8 draws at p=0.5 this seed gives both kinds
    for i in range(b):
        same = torch.equal(mixed[i], batch["pixel_values"][i])
        assert same == bool(labels[i, 0]), "label 1 exactly when the mixed video is the clip's own"
        assert any(torch.equal(mixed[i], batch["pixel_values"][j]) for j in range(b))


def test_frames_are_normalised_like_the_video_transform(shard_writer, tmp_path):
    from tvlt_core import shards, video

    url = shard_writer(tmp_path / "s", counts=[2])
    raw = next(iter(__import__("tvlt_core.data.stream", fromlist=["read_shard"]).read_shard(url + "/shard-00000.tar")))
    sample = shards.decode_sample(raw)
    batch = run(StreamingLoader(url, make_batcher(matching=False), batch_size=2, shuffle_buffer=1), 1)[0]
    i = batch["keys"].index(sample.key)
    idx = np.linspace(0, len(sample.frames) - 1, FRAMES).round().astype(int)
    torch.testing.assert_close(batch["pixel_values"][i], video.normalize(sample.frames[idx]))
    assert "labels" not in batch


def test_corrupt_sample_is_skipped_and_logged(shard_writer, tmp_path, caplog):
    url = shard_writer(tmp_path / "s", counts=[5], corrupt={2})
    # one sample in five: a skip share of 0.2, allowed here (test_integrity.py holds the share's own tests)
    loader = StreamingLoader(url, make_batcher(), batch_size=2, shuffle_buffer=1, policy=ReadPolicy(max_skip_share=0.25))
    with caplog.at_level(logging.WARNING):
        batches = run(loader, loader.steps_per_epoch)
    assert len(batches) == 2 and "skipping sample" in caplog.text
    assert len(set(keys_of(batches))) == 4


def test_shards_on_s3(shard_writer, s3_bucket):
    url = shard_writer(f"{s3_bucket}/loader", counts=[3, 4])
    loader = StreamingLoader(url, make_batcher(), batch_size=2, rank=1, world_size=2, shuffle_buffer=2)
    batches = run(loader, loader.steps_per_epoch)
    assert len(batches) == 1 and batches[0]["pixel_values"].shape[0] == 2


def test_tvp_batches_tokenise_one_query_per_video(shard_writer, grounding_sentences, tmp_path):
    from tvlt_core.text import TextTokenizer, build_vocab

    url = shard_writer(tmp_path / "g", counts=[3], frames=6, size=40, grounding=True)
    tokenizer = TextTokenizer.from_vocab(build_vocab(grounding_sentences, vocab_size=60), max_text_length=12)
    batcher = TvpBatcher(tokenizer=tokenizer, image_size=32, num_frames=8)  # more frames than stored: repeated
    batch = run(StreamingLoader(url, batcher, batch_size=3, shuffle_buffer=1), 1)[0]
    assert batch["pixel_values"].shape == (3, 8, 3, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 12)
    labels = batch["labels"]
    assert labels.shape == (3, 3) and ((0 <= labels[:, 1]) & (labels[:, 1] < labels[:, 2]) & (labels[:, 2] <= labels[:, 0])).all()
    for i, sentence in enumerate(batch["sentences"]):
        assert sentence in grounding_sentences
        torch.testing.assert_close(batch["input_ids"][i], tokenizer([sentence])["input_ids"][0])
    assert (batch["pixel_values"][:, :, :, 0] == -1).all(), "40x30 frames are padded to square: top row is padding"
    assert (batch["pixel_values"][:, :, :, 16] != -1).any()


def test_matching_negatives_come_from_other_source_videos():
    batcher = make_batcher(mismatch_prob=1.0)
    rng = random.Random(0)
    sources = ["a", "a", "a", "b", "c", "c"]
    for _ in range(50):
        shown = batcher.draw_pairs(sources, rng)
        assert all(sources[j] != sources[i] for i, j in enumerate(shown.tolist())), shown
    # one source in the whole batch: any other clip is the only negative there is
    assert all(j != i for i, j in enumerate(batcher.draw_pairs(["a"] * 4, rng).tolist()))
    assert batcher.draw_pairs(["a"], rng).tolist() == [0]
