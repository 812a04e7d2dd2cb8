"""The preprocessing job end to end on a real local Ray cluster, real mp4 files and moto's S3 server on loopback.

One clean pretrain run over the synthetic corpus (good and broken files) and odd real files (rotated, variable
frame rate, 8-bit 8 kHz audio, odd sides, shorter than a clip) is shared by the checks that read its output;
the other tests run the job again: nothing new, incremental, killed and resumed, grounding, S3. Decoder crashes
are tested on the decode stage itself (tests/test_preprocess_units.py): the stage never raises for an input.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from fixtures.odd_media import MARKER, write_all, write_video

from jobs.preprocess import EXIT_HELD, main
from pipelines.lease import LEASE_NAME
from tvlt_core import audio as tvlt_audio
from tvlt_core import clips
from tvlt_core import shards
from tvlt_core import video as tvlt_video

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config", "preprocess_tiny", "--mode", "pretrain"]  # 2 s clips, 2 MB shards
EXPECTED_REASONS = {  # broken kind -> quarantine reason
    "truncated": "not_a_video", "truncated_tail": "undecodable_video", "zero_bytes": "empty_object",
    "not_video": "not_a_video", "no_audio": "no_audio", "audio_only": "no_video_stream", "one_frame": "too_short",
}


# ------------------------------------------------------------------------------------------ direct computation
def reference_frames(path: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Every frame of the file, upright, decoded by PyAV (not decord), and its presentation time."""
    frames, times = [], []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            image = frame.to_ndarray(format="rgb24")
            # FFmpeg's display matrix angle is counter-clockwise; np.rot90 turns counter-clockwise too.
            frames.append(np.ascontiguousarray(np.rot90(image, k=round((frame.rotation or 0) / 90) % 4)))
            times.append(float(frame.time))
    return frames, np.array(times)


def reference_audio(path: str) -> tuple[np.ndarray, int, float]:
    """The first audio track as float32 mono (channel mean), converted by hand from its sample format."""
    chunks, rate, offset = [], 0, None
    with av.open(path) as container:
        for frame in container.decode(audio=0):
            offset = float(frame.time) if offset is None else offset
            rate, data, fmt = frame.sample_rate, frame.to_ndarray(), frame.format.name
            channels = len(frame.layout.channels)
            if not frame.format.is_planar:
                data = data.reshape(-1, channels).T
            scale = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0}.get(fmt.rstrip("p"))
            data = (data.astype(np.float64) - (128 if fmt.startswith("u8") else 0)) / scale if scale else data
            chunks.append(data.astype(np.float32))
    return np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float32), rate, offset or 0.0


def check_sample(sample: shards.DecodedSample, ref_frames, ref_times, ref_audio, frames: int) -> None:
    """The stored frames are the frames on screen at the clip's instants; the spectrogram is log_mel of the clip."""
    rec = sample.record
    clip = clips.Clip(rec["clip"], rec["start"], rec["end"])
    instants = clips.frame_times(clip, frames)
    assert sample.frames.shape[0] == frames == rec["frames"]
    cropped = sample.frames.shape[1:3] == (224, 224)
    stored = (lambda f: tvlt_video.resize_center_crop(f, 224)) if cropped else (lambda f: f)
    for got, t in zip(sample.frames.astype(np.int16), instants):
        expected = int(np.searchsorted(ref_times, t + 1e-6, side="right") - 1)
        want = stored(ref_frames[expected]).astype(np.int16)
        err = np.abs(got - want).mean()
        assert err < 3.0, f"{rec['uri']} t={t:.3f}: mean error {err:.2f} against frame {expected}"
        for other in (expected - 1, expected + 1):  # and it is not a neighbour that happens to look alike
            if 0 <= other < len(ref_frames):
                near = stored(ref_frames[other]).astype(np.int16)
                if np.abs(near - want).mean() > 2.0:
                    assert err < np.abs(got - near).mean(), f"{rec['uri']} t={t:.3f}: closer to frame {other}"
    if ref_audio is None:
        assert sample.mel is None and rec["audio_present"] is False
        return
    samples, rate, offset = ref_audio
    a, b = max(0, round((clip.start - offset) * rate)), max(0, round((clip.end - offset) * rate))
    want_mel = tvlt_audio.log_mel(samples[a:b].copy(), rate).numpy()
    assert sample.mel.shape == want_mel.shape == (rec["mel_frames"], 128)
    np.testing.assert_allclose(sample.mel, want_mel, atol=2e-3, rtol=0)  # float16 storage


def read_back(out: Path) -> dict[str, shards.DecodedSample]:
    """Every committed sample, read with stock webdataset; also checks that ``tar`` lists each shard."""
    urls = shards.shard_urls(str(out))
    for url in urls:
        listing = subprocess.run(["tar", "-tf", url], capture_output=True, text=True, check=True).stdout.split()
        assert listing and all("." in name for name in listing)
    samples = {}
    for raw in wds.WebDataset(urls, shardshuffle=False):
        sample = shards.decode_sample(raw)
        assert sample.key not in samples, f"duplicate key {sample.key}"
        samples[sample.key] = sample
    return samples


def sample_digests(out: Path) -> dict[str, str]:
    digests = {}
    for url in shards.shard_urls(str(out)):
        with tarfile.open(url) as tar:
            for member in tar:
                key = member.name.split(".", 1)[0]
                data = digests.get(key, "").encode() + tar.extractfile(member).read()
                digests[key] = hashlib.sha256(data).hexdigest()
    return digests


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def inputs(synthetic_corpus, tmp_path_factory) -> Path:
    """A folder of copies: 6 synthetic pretraining clips, every broken kind, and the odd files."""
    folder = tmp_path_factory.mktemp("inputs")
    for video in synthetic_corpus.videos:
        if video["kind"] in ("pretrain", "broken"):
            shutil.copy(synthetic_corpus.path(video), folder / Path(video["path"]).name)
    write_all(folder)
    return folder


@pytest.fixture(scope="module")
def clean_run(ray_cluster, inputs, tmp_path_factory):
    """One clean pretrain run over ``inputs``; returns (output folder, exit code)."""
    out = tmp_path_factory.mktemp("clean") / "shards"
    code = main([*TINY, "--input", str(inputs), "--output", str(out), "--fail-on-quarantine"])
    return out, code


# ------------------------------------------------------------------------------------------------------- tests
def test_bad_inputs_are_quarantined_with_a_reason_and_good_ones_all_land_in_shards(clean_run, inputs,
                                                                                      synthetic_corpus):
    out, code = clean_run
    assert code == 1  # --fail-on-quarantine with quarantined inputs; 0 without the flag (see the S3 test)
    manifest = shards.load_manifest(str(out))
    quarantined = {Path(q["uri"]).stem: q for q in map(json.loads, (out / shards.QUARANTINE_NAME).read_text()
                                                        .splitlines())}
    assert {k: q["reason"] for k, q in quarantined.items()} == EXPECTED_REASONS
    assert all(q["error"] and q["stage"] in ("probe", "decode") for q in quarantined.values())
    good = sorted(p.name for p in inputs.iterdir() if p.stem not in EXPECTED_REASONS)
    assert sorted(Path(u).name for u, s in manifest.sources.items() if s["status"] == "ok") == good
    gen = manifest.generations[-1]
    assert gen.finished and gen.inputs == len(good) + len(EXPECTED_REASONS) and gen.samples == manifest.num_samples
    assert not (out / "_work").exists() and all(not n.startswith(".") for n in os.listdir(out))
    stats = json.loads((out / shards.STATS_NAME).read_text())["last_run"]
    assert stats["samples"] == manifest.num_samples and sum(stats["quarantined"].values()) == len(EXPECTED_REASONS)
    assert all(s.bytes == (out / s.name).stat().st_size for s in manifest.shards)


def test_every_sample_matches_a_direct_computation_on_its_source(clean_run, inputs):
    out, _ = clean_run
    manifest = shards.load_manifest(str(out))
    samples = read_back(out)
    assert len(samples) == manifest.num_samples
    by_uri: dict[str, list] = {}
    for sample in samples.values():
        by_uri.setdefault(sample.record["uri"], []).append(sample)
    for uri, got in by_uri.items():
        ref_frames, ref_times = reference_frames(uri)
        ref_audio = reference_audio(uri)
        windows = clips.windows(got[0].record["duration"], 2.0, 2.0, 0.5)
        assert sorted(s.key for s in got) == [shards.sample_key(uri, c.index) for c in windows]
        for sample in got:
            rec = sample.record
            assert (rec["size"], rec["recipe"], rec["mode"]) == (os.path.getsize(uri), manifest.recipe_hash, "pretrain")
            check_sample(sample, ref_frames, ref_times, ref_audio, frames=8)
    rotated = samples[shards.sample_key(str(inputs / "rotated.mp4"), 0)]
    assert (rotated.record["width"], rotated.record["height"], rotated.record["rotation"]) == (180, 320, 90)
    quadrant = rotated.frames[0, :100, :100].reshape(-1, 3).mean(0)  # upright: red top-left quadrant
    assert np.abs(quadrant - MARKER).max() < 20
    short = [s for s in samples.values() if s.record["uri"].endswith("short.mp4")]
    assert len(short) == 1 and short[0].record["end"] == pytest.approx(0.8)
    assert samples[shards.sample_key(str(inputs / "u8_8k.mov"), 0)].record["sample_rate"] == 8000


def test_a_second_run_with_nothing_new_does_nothing_and_says_so(clean_run, inputs, capsys):
    out, _ = clean_run
    before = (out / shards.MANIFEST_NAME).read_bytes()
    assert main([*TINY, "--input", str(inputs), "--output", str(out)]) == 0
    assert "nothing_to_do" in capsys.readouterr().out
    assert (out / shards.MANIFEST_NAME).read_bytes() == before


@pytest.mark.slow
def test_killed_with_sigkill_and_restarted_gives_exactly_the_clean_samples(clean_run, inputs, ray_cluster, tmp_path,
                                                                           caplog):
    """The killed run's lease refuses a run started before it expires; the first run after expiry takes over."""
    out = tmp_path / "shards"
    argv = [*TINY, "--input", str(inputs), "--output", str(out), "--shards.target_bytes", "300000",
            "--lease.ttl_s", "20", "--lease.renew_s", "5"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": str(REPO)}
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "preprocess.py"), *argv], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed_at = time.monotonic() + 300, None
    while time.monotonic() < deadline and job.poll() is None:
        if (out / shards.MANIFEST_NAME).exists():
            m = shards.load_manifest(str(out))
            if m.shards and m.pending is not None:  # committed shards, generation not finished: kill now
                job.send_signal(signal.SIGKILL)
                killed_at = len(m.shards)
                break
        time.sleep(0.05)
    job.wait(timeout=60)
    assert killed_at is not None, "the job finished before it could be killed mid-run"
    assert shards.load_manifest(str(out)).pending is not None
    before = (out / shards.MANIFEST_NAME).read_bytes()
    lease = json.loads((out / LEASE_NAME).read_text())
    assert main(argv) == EXIT_HELD  # the dead run's lease still holds (renewed at most 5 s before the kill)
    holder = lease["holder"]
    assert f"being written by run {holder['run_id']} (pid {job.pid} on {holder['host']})" in caplog.text
    assert f"expires {lease['expires']}" in caplog.text
    assert (out / shards.MANIFEST_NAME).read_bytes() == before and json.loads((out / LEASE_NAME).read_text()) == lease
    deadline = time.monotonic() + 60
    while datetime.now(timezone.utc) <= datetime.fromisoformat(lease["expires"]):
        assert time.monotonic() < deadline, f"the lease did not expire by {lease['expires']}"
        time.sleep(0.2)
    assert main(argv) == 0  # the first run after expiry takes over and resumes the same generation
    assert "took over the lease" in caplog.text
    manifest = shards.load_manifest(str(out))
    assert len(manifest.generations) == 1 and manifest.generations[0].attempts == 2
    assert manifest.generations[0].finished
    names = [s.name for s in manifest.shards]
    assert names == [shards.shard_name(1, i) for i in range(len(names))] and len(names) > killed_at
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == names  # no orphans, no temporaries
    assert sample_digests(out) == sample_digests(clean_run[0])  # same keys, byte-identical samples
    def outcome(m):  # decoder messages carry a clock time, so compare where and why, not the text
        return [(q.uri, q.stage, q.reason) for q in m.quarantine()]

    assert outcome(manifest) == outcome(shards.load_manifest(str(clean_run[0])))


def driver_io() -> dict[str, int]:
    """Bytes this process has read and written through system calls (files, pipes, sockets): Linux /proc/self/io."""
    counters = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(counters[k]) for k in ("rchar", "wchar")}


def test_shard_bytes_go_from_the_workers_to_the_store_without_passing_through_the_driver(clean_run, inputs,
                                                                                           tmp_path):
    """This test process is the job's driver: what it reads and writes during a run is far below the shards' bytes
    (assembling shards in the driver read every part and wrote every shard: at least twice their size)."""
    out = tmp_path / "shards"
    before = driver_io()
    assert main([*TINY, "--input", str(inputs), "--output", str(out)]) == 0
    moved = {k: v - before[k] for k, v in driver_io().items()}
    shard_bytes = sum(s.bytes for s in shards.load_manifest(str(out)).shards)
    assert shard_bytes == sum(s.bytes for s in shards.load_manifest(str(clean_run[0])).shards) > 1_000_000
    assert moved["wchar"] < 0.2 * shard_bytes and moved["rchar"] < 0.5 * shard_bytes, (moved, shard_bytes)


def reference_keyframe_times(path: str) -> np.ndarray:
    """Presentation times of the file's keyframes, as PyAV's decoder flags them (not decord's index)."""
    with av.open(path) as container:
        return np.array([float(f.time) for f in container.decode(video=0) if f.key_frame])


def test_keyframe_sampling_stores_each_clips_keyframe_nearest_its_instants(ray_cluster, tmp_path):
    from synthetic import generate_corpus

    corpus = generate_corpus(tmp_path / "corpus", n_pretrain=2, seed=5, size=(320, 240), duration=(4.0, 5.0),
                             gop_seconds=0.5, workers=1)  # fmt: skip
    out = tmp_path / "keyframe"
    assert main([*TINY, "--input", str(tmp_path / "corpus" / "pretrain"), "--output", str(out),
                 "--clips.sampling", "keyframe"]) == 0  # fmt: skip
    manifest = shards.Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.recipe["frame_sampling"] == "keyframe-nearest-segment-centre"
    samples = read_back(out)
    assert len(samples) == sum(len(clips.windows(v["duration"], 2.0, 2.0, 0.5)) for v in corpus.videos) > 0
    moved = 0
    for sample in samples.values():
        rec = sample.record
        path = rec["uri"]
        ref_frames, ref_times = reference_frames(path)
        key_times = reference_keyframe_times(path)
        inside = key_times[(key_times >= rec["start"] - 1e-6) & (key_times < rec["end"] - 1e-6)]
        assert len(inside) >= 2  # a keyframe every 0.5 s (the last clip may be short)
        for got, t, stored_t in zip(sample.frames.astype(np.int16), clips.frame_times(
                clips.Clip(rec["clip"], rec["start"], rec["end"]), 8), rec["frame_times"], strict=True):
            distance = np.abs(inside - t)
            want_t = inside[np.flatnonzero(distance <= distance.min() + 1e-6)[0]]  # the earlier one on a tie
            assert stored_t == pytest.approx(want_t, abs=1e-3)
            want = ref_frames[int(np.argmin(np.abs(ref_times - want_t)))]
            want = tvlt_video.resize_center_crop(want, 224).astype(np.int16)
            err = np.abs(got - want).mean()
            assert err < 3.0, f"{path} t={t:.3f}: mean error {err:.2f} against the keyframe at {want_t:.3f} s"
            exact = int(np.searchsorted(ref_times, t + 1e-6, side="right") - 1)
            if abs(ref_times[exact] - want_t) > 1e-3:
                moved += 1
                near = tvlt_video.resize_center_crop(ref_frames[exact], 224).astype(np.int16)
                if np.abs(near - want).mean() > 2.0:  # the exact frame looks different: the stored one is the key
                    assert err < np.abs(got - near).mean()
    assert moved > 0  # some instants do fall between keyframes, so the mode did choose other frames


def test_grounding_mode_stores_48_frames_once_per_video_with_all_its_queries(ray_cluster, synthetic_corpus, tmp_path):
    out = tmp_path / "grounding"
    annotations = [str(synthetic_corpus.annotation_file(s)) for s in ("train", "test")]
    assert main(["--config", "preprocess_tiny", "--mode", "grounding", "--input",
                 str(synthetic_corpus.root / "grounding"), "--output", str(out),
                 "--grounding.annotations", json.dumps(annotations)]) == 0
    samples = read_back(out)
    videos = synthetic_corpus.of_kind("grounding")
    assert sorted(samples) == sorted(shards.sample_key(str(synthetic_corpus.path(v)), 0) for v in videos)
    for video in videos:
        sample = samples[shards.sample_key(str(synthetic_corpus.path(video)), 0)]
        rec = sample.record
        assert rec["queries"] == [{"sentence": e["sentence"], "start": e["start"], "end": e["end"]}
                                  for e in video["events"]]
        assert rec["duration"] == pytest.approx(video["duration"], abs=0.05)
        assert max(sample.frames.shape[1:3]) == 448 and sample.mel is None
        ref_frames, ref_times = reference_frames(str(synthetic_corpus.path(video)))
        h, w = ref_frames[0].shape[:2]
        assert sample.frames.shape[1:3] == ((448, int(448 * w / h)) if h >= w else (int(448 * h / w), 448))
        size = (sample.frames.shape[2], sample.frames.shape[1])
        resized = [np.asarray(Image.fromarray(f).resize(size, resample=Image.BILINEAR)) for f in ref_frames]
        for got, t in zip(sample.frames, clips.frame_times(clips.whole(rec["duration"]), 48)):
            want = resized[int(np.searchsorted(ref_times, t + 1e-6, side="right") - 1)]
            assert np.abs(got.astype(np.int16) - want.astype(np.int16)).mean() < 3.0


def test_s3_input_and_output_through_an_s3_compatible_endpoint(ray_cluster, synthetic_corpus, s3_endpoint,
                                                               tmp_path, caplog, capsys):
    secret = "s3cr3t-value-never-logged"
    fs = fsspec.filesystem("s3", key="test-key", secret=secret, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("raw")
    picks = [v for v in synthetic_corpus.videos if v["kind"] == "pretrain"][:2] + [
        v for v in synthetic_corpus.videos if v.get("broken") in ("no_audio", "not_video")]
    for video in picks:
        fs.put_file(str(synthetic_corpus.path(video)), f"raw/videos/{Path(video['path']).name}")
    argv = [*TINY, "--input", "s3://raw/videos", "--output", "s3://raw/shards", "--audio.missing", "silent",
            "--storage.endpoint_url", s3_endpoint, "--storage.aws_access_key_id", "test-key",
            "--storage.aws_secret_access_key", secret]
    assert main(argv) == 0  # quarantined inputs, but no --fail-on-quarantine
    opts = {"key": "test-key", "secret": secret, "client_kwargs": {"endpoint_url": s3_endpoint}}
    with fsspec.open("s3://raw/shards/manifest.json", "r", **opts) as f:
        manifest = shards.Manifest.from_json(f.read())
    assert [Path(q.uri).name for q in manifest.quarantine()] == ["not_video.mp4"]
    fs.get("raw/shards", str(tmp_path / "copy"), recursive=True)
    samples = read_back(tmp_path / "copy")
    assert len(samples) == manifest.num_samples > 0
    silent = [s for s in samples.values() if s.record["uri"] == "s3://raw/videos/no_audio.mp4"]
    assert silent and all(s.mel is None and s.record["audio_present"] is False for s in silent)
    for sample in samples.values():
        local = next(synthetic_corpus.path(v) for v in picks if sample.record["uri"].endswith(Path(v["path"]).name))
        check_sample(sample, *reference_frames(str(local)),
                     None if sample.mel is None else reference_audio(str(local)), frames=8)
    assert not fs.exists("raw/shards/_work")
    with fsspec.open("s3://raw/shards/config.yaml", "r", **opts) as f:
        written = f.read()
    printed = capsys.readouterr()
    assert secret not in written + printed.out + printed.err + caplog.text
    assert "aws_secret_access_key: '***'" in written


@pytest.mark.slow
def test_incremental_run_processes_only_new_and_changed_sources(clean_run, inputs, tmp_path, capsys):
    """Last in the module: it changes ``inputs`` (the URIs must be those of the clean run's manifest)."""
    out = tmp_path / "shards"
    shutil.copytree(clean_run[0], out)
    before = read_back(out)
    changed, new = inputs / "short.mp4", inputs / "added.mp4"
    write_video(changed, seconds=1.2)  # same name, new content: size and mtime change
    write_video(new, seconds=3.0)  # two clips: [0, 2] and the trailing [2, 3]
    argv = [*TINY, "--input", str(inputs), "--output", str(out)]
    assert main(argv) == 0
    manifest = shards.load_manifest(str(out))
    stats = json.loads((out / shards.STATS_NAME).read_text())
    assert (stats["last_run"]["new"], stats["last_run"]["changed"], stats["last_run"]["inputs"]) == (1, 1, 2)
    assert set(stats["generations"]) == {"1", "2"}
    gen = manifest.generations[-1]
    assert (gen.id, gen.inputs, len(manifest.generations)) == (2, 2, 2)
    assert len(gen.retired) == 1  # the shard that held the old short.mp4 sample, rewritten without it
    after = read_back(out)
    key = shards.sample_key(str(changed), 0)
    assert before[key].record["end"] == pytest.approx(0.8) and after[key].record["end"] == pytest.approx(1.2)
    added = {k for k in after if after[k].record["uri"] == str(new)}
    assert added == {shards.sample_key(str(new), i) for i in range(2)}
    assert set(after) == set(before) | added  # nothing lost, nothing twice
    assert manifest.sources[str(changed)]["generation"] == manifest.sources[str(new)]["generation"] == 2
    unchanged = [k for k in before if before[k].record["uri"] != str(changed)]
    assert all(np.array_equal(after[k].frames, before[k].frames) for k in unchanged)
    capsys.readouterr()
    assert main(argv) == 0  # and then nothing is new
    assert "nothing_to_do" in capsys.readouterr().out
    assert shards.load_manifest(str(out)).generation == 2
