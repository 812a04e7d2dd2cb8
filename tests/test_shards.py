"""The shard contract: stable keys, sample encoding that stock webdataset and tar read back, manifest JSON."""

import tarfile

import numpy as np
import webdataset as wds

from tvlt_core import shards


def _sample(rng, n_frames=8):
    frames = rng.integers(0, 256, size=(n_frames, 32, 48, 3), dtype=np.uint8)
    frames[:] = frames.mean(axis=(1, 2), keepdims=True).astype(np.uint8)  # flat colours survive JPEG almost exactly
    mel = rng.uniform(-1, 1, size=(40, 128)).astype(np.float32)
    return frames, mel


def test_keys_are_stable_and_webdataset_safe():
    a = shards.sample_key("s3://b/videos/a.b.mp4", 3)
    assert a == shards.sample_key("s3://b/videos/a.b.mp4", 3)
    assert a != shards.sample_key("s3://b/videos/a.b.mp4", 4) != shards.sample_key("s3://b/videos/c.mp4", 3)
    assert "." not in a and a.endswith("_0003")
    assert shards.recipe_hash({"a": 1, "b": 2}) == shards.recipe_hash({"b": 2, "a": 1})


def test_samples_round_trip_through_a_tar_read_by_stock_webdataset(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    path = tmp_path / "shard-00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for clip in range(3):
            frames, mel = _sample(rng)
            key = shards.sample_key("file:///v.mp4", clip)
            written[key] = (frames, mel)
            sink.write(shards.encode_sample(key, frames, {"clip": clip}, mel=mel if clip else None))

    names = tarfile.open(path).getnames()
    assert names[:9] == [f"{shards.sample_key('file:///v.mp4', 0)}.{shards.frame_ext(i)}" for i in range(8)] + [
        f"{shards.sample_key('file:///v.mp4', 0)}.json"
    ]
    seen = 0
    for raw in wds.WebDataset(str(path), shardshuffle=False):
        sample = shards.decode_sample(raw)
        frames, mel = written[sample.key]
        assert sample.frames.shape == frames.shape and sample.frames.dtype == np.uint8
        assert np.abs(sample.frames.astype(int) - frames.astype(int)).max() <= 3  # JPEG q90 of flat colour
        if sample.record["clip"] == 0:
            assert sample.mel is None
        else:
            np.testing.assert_allclose(sample.mel, mel.astype(np.float16).astype(np.float32))
        seen += 1
    assert seen == 3


def test_manifest_round_trip(tmp_path):
    m = shards.Manifest(mode="pretrain", recipe={"frames": 8}, recipe_hash=shards.recipe_hash({"frames": 8}))
    m.generations.append(shards.Generation(id=1, started="t0", finished="t1", inputs=2))
    m.shards.append(shards.ShardEntry(name="shard-000001-00000.tar", samples=5, bytes=100, generation=1))
    (tmp_path / shards.MANIFEST_NAME).write_text(m.to_json())
    back = shards.load_manifest(str(tmp_path))
    assert back == m and back.num_samples == 5 and back.generation == 1
    assert shards.shard_urls(str(tmp_path)) == [f"{tmp_path}/shard-000001-00000.tar"]
