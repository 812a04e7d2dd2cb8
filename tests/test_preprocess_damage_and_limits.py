"""Damaged and huge inputs, on real files generated here: damage costs the clips it touches, memory stays bounded.

    bitrot.mp4       12 s h264 + AAC with 20 kB of random bytes in the middle: keeps every clip that decodes, lists
                     the lost ones (clip, time range, reason) in its manifest entry and in quarantine.jsonl
    uhd.mp4          2 s of 3840x2160 frames: lands (frames resized in the decoder child), or is quarantined as
                     too_large under a small decoder memory limit
    long_audio.mp4   4 s of video with two hours of 48 kHz silence (1.4 GB as float32, more than the decoder's
                     limit here): lands, because audio is decoded per clip
    long_video.mp4   two hours of video (two frames) and audio: quarantined as too_long under limits.max_duration_s
The job goes on past each of them: the ordinary videos beside them land with the numbers they always had.
"""

import json
import shutil
from pathlib import Path

import decord
import numpy as np
import pytest
from fixtures.odd_media import bit_rot, damage_packets, write_cheap_long, write_video

from jobs.preprocess import main
from pipelines import decoders
from pipelines.config import LimitConfig
from pipelines.sandbox import Sandbox, SandboxError
from tvlt_core import clips
from tvlt_core import shards
from tvlt_core.resize import FrameResize
from tvlt_core.video import resize_center_crop

TINY = ["--config", "preprocess_tiny", "--mode", "pretrain"]  # 2 s clips, 8 frames, 224 px
GiB = 1024**3


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("damage_media")
    clean = write_video(folder / "clean.mp4", width=320, height=180, seconds=12.0)
    shutil.copy(clean, folder / "bitrot.mp4")
    shutil.copy(clean, folder / "concealed.mp4")
    return {
        "clean": clean,
        "bitrot": bit_rot(folder / "bitrot.mp4", at=0.5, length=20_000),
        "concealed": damage_packets(folder / "concealed.mp4", conceal_at=3.0, refuse_at=11.0),
        "uhd": write_cheap_long(folder / "uhd.mp4", width=3840, height=2160, video_s=2.0, audio_s=2.0),
        "long_audio": write_cheap_long(folder / "long_audio.mp4", width=160, height=96, video_s=4.0, audio_s=7200.0),
        "long_video": write_cheap_long(folder / "long_video.mp4", width=160, height=96, video_s=7200.0,
                                       audio_s=7200.0),
    }


def _inputs(tmp_path: Path, media: dict[str, Path], names: list[str]) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names:
        shutil.copy(media[name], folder / media[name].name)
    return folder


def _samples_by_clip(out: Path, uri: str) -> dict[int, shards.DecodedSample]:
    import webdataset as wds

    samples = (shards.decode_sample(s) for s in wds.WebDataset(shards.shard_urls(str(out)), shardshuffle=False))
    return {s.record["clip"]: s for s in samples if s.record["uri"] == uri}


# ------------------------------------------------------------------------------------------ the decoder child
def test_frames_resized_in_the_decoder_are_the_frames_resized_after_it(media):
    times = [clips.frame_times(c, 8).tolist() for c in clips.windows(12.0, 2.0, 2.0, 0.5)]
    try:
        whole = decoders.decode_frames(str(media["clean"]), times)
        decoders.release()
        resized = decoders.decode_frames(str(media["clean"]), times, FrameResize("center_crop", 224), (180, 320))
    finally:
        decoders.release()
    assert not whole["lost"] and not resized["lost"]
    for full, small in zip(whole["frames"], resized["frames"], strict=True):
        assert full.shape == (8, 180, 320, 3) and small.shape == (8, 224, 224, 3)
        np.testing.assert_array_equal(small, resize_center_crop(full, 224))


def test_damage_costs_only_the_clips_whose_frames_it_touches(media):
    times = [clips.frame_times(c, 8).tolist() for c in clips.windows(12.0, 2.0, 2.0, 0.5)]
    try:
        clean = decoders.decode_frames(str(media["clean"]), times, FrameResize("center_crop", 224), (180, 320))
        damaged = decoders.decode_frames(str(media["bitrot"]), times, FrameResize("center_crop", 224), (180, 320))
    finally:
        decoders.release()
    assert 0 < len(damaged["lost"]) < len(times), damaged["lost"]
    for k, (reason, error) in damaged["lost"].items():
        first, last = clean["indices"][k][0], clean["indices"][k][-1]
        assert reason == "undecodable_frames" and error.startswith(f"frames {first}-{last}: ") and "packet" in error
    for k, (good, got) in enumerate(zip(clean["frames"], damaged["frames"], strict=True)):
        if k in damaged["lost"]:
            assert got is None
        else:  # a clip the damage does not touch decodes exactly as in the undamaged file
            np.testing.assert_array_equal(got, good, err_msg=f"clip {k}")


def test_a_clip_that_needs_a_concealed_frame_is_lost_once_the_file_is_known_damaged(media):
    windows = clips.windows(12.0, 2.0, 2.0, 0.5)
    times = [clips.frame_times(c, 8).tolist() for c in windows]
    # decord conceals the damaged packet at 3 s without a word: clip 1's frames are not the clean file's
    vr, clean_vr = (decord.VideoReader(str(media[k]), num_threads=1) for k in ("concealed", "clean"))
    starts = clean_vr.get_frame_timestamp(np.arange(len(clean_vr)))[:, 0]
    idx = clips.frame_indices(np.array(times[1]), starts).tolist()
    assert np.abs(vr.get_batch(idx).asnumpy().astype(int) - clean_vr.get_batch(idx).asnumpy()).max() > 0
    try:
        clean = decoders.decode_frames(str(media["clean"]), times, FrameResize("center_crop", 224), (180, 320))
        decoders.release()
        damaged = decoders.decode_frames(str(media["concealed"]), times, FrameResize("center_crop", 224), (180, 320))
    finally:
        decoders.release()
    lost = {k: reason for k, (reason, _) in damaged["lost"].items()}
    assert lost[1] == "concealed_frames" and lost[5] == "undecodable_frames", damaged["lost"]
    # every clip whose decode chain (from the keyframe at 0 s) holds the 3 s packet is lost; clip 0 is not
    assert all(lost.get(k) for k in range(1, 6)) and 0 not in lost
    assert "3.000 s" in damaged["lost"][1][1]
    np.testing.assert_array_equal(damaged["frames"][0], clean["frames"][0])


def test_the_decoder_child_refuses_what_does_not_fit_in_its_memory_limit(media):
    sandbox = Sandbox("decode-limit-test", timeout_s=120, memory_bytes=int(0.3 * GiB))
    try:
        # 4K frames: refused up front (decord would abort the process where an allocation fails)
        with pytest.raises(SandboxError) as err:
            sandbox.call("decode_frames", path=str(media["uhd"]), times=[[0.1, 1.1]],
                         resize=FrameResize("center_crop", 224), frame_size=(2160, 3840))
        assert err.value.reason == "too_large" and "limits.decoder_memory_gib" in err.value.message
        # one window of two hours of audio (1.4 GB as float32): an allocation fails under the limit
        with pytest.raises(SandboxError) as err:
            sandbox.call("decode_audio_windows", path=str(media["long_audio"]), windows=[[0.0, 7200.0]])
        assert err.value.reason == "too_large"
        # the same track clip by clip fits, and a fresh child (the last one was replaced) decodes ordinary frames
        out = sandbox.call("decode_audio_windows", path=str(media["long_audio"]), windows=[[0.0, 2.0], [2.0, 4.0]])
        assert [len(a) for a in out["audio"]] == [96000, 96000] and not any(a.any() for a in out["audio"])
        frames = sandbox.call("decode_frames", path=str(media["clean"]), times=[[0.5, 1.5]],
                              resize=FrameResize("center_crop", 224), frame_size=(180, 320))
        assert frames["frames"][0].shape == (2, 224, 224, 3)
    finally:
        sandbox.close()


@pytest.mark.parametrize("field, value", [("max_bytes", -1), ("max_pixels", -5), ("max_duration_s", -1.0),
                                          ("decoder_memory_gib", 0.1)])
def test_bad_limits_fail_naming_the_setting(field, value):
    with pytest.raises(ValueError, match=f"limits.{field}"):
        LimitConfig(**{field: value})


def test_each_cap_names_itself():
    caps = LimitConfig(max_bytes=1000, max_pixels=1920 * 1080, max_duration_s=60.0)
    assert caps.over(999, 1920, 1080, 60.0) is None
    assert caps.over(1001, 10, 10, 1.0)[0] == "too_large" and "limits.max_bytes" in caps.over(1001, 10, 10, 1.0)[1]
    assert caps.over(10, 3840, 2160, 1.0)[0] == "resolution_too_high"
    assert caps.over(10, 10, 10, 61.0)[0] == "too_long"
    assert LimitConfig(max_bytes=0, max_pixels=0, max_duration_s=0).over(10**12, 10**5, 10**5, 1e9) is None


# ------------------------------------------------------------------------------------------------ the job
def test_a_damaged_video_keeps_its_good_clips_and_huge_inputs_land_or_are_quarantined(ray_cluster, media, tmp_path):
    inputs = _inputs(tmp_path, media, ["clean", "bitrot", "uhd", "long_audio", "long_video"])
    out = tmp_path / "out"
    # A decoder limit below what the two-hour track takes whole (1.4 GB), above what 4K frames take a few at a time.
    code = main([*TINY, "--input", str(inputs), "--output", str(out), "--limits.decoder_memory_gib", "0.9",
                 "--limits.max_duration_s", "3600"])
    assert code == 0
    manifest = shards.load_manifest(str(out))
    entries = {Path(u).stem: e for u, e in manifest.sources.items()}
    assert {k: e["status"] for k, e in entries.items()} == {
        "clean": "ok", "bitrot": "ok", "uhd": "ok", "long_audio": "ok", "long_video": "quarantined"}
    assert entries["long_video"]["reason"] == "too_long" and "limits.max_duration_s" in entries["long_video"]["error"]

    # bitrot: every clip is kept, identical to the undamaged file's, or listed as lost with its range and reason
    uri, clean_uri = str(inputs / "bitrot.mp4"), str(inputs / "clean.mp4")
    lost = entries["bitrot"]["lost_clips"]
    kept, reference = _samples_by_clip(out, uri), _samples_by_clip(out, clean_uri)
    assert lost and kept and sorted([*kept, *(c["clip"] for c in lost)]) == sorted(reference)
    for c in lost:
        window = clips.windows(12.0, 2.0, 2.0, 0.5)[c["clip"]]
        assert (c["start"], c["end"], c["reason"]) == (window.start, window.end, "undecodable_frames") and c["error"]
    for k, sample in kept.items():
        np.testing.assert_array_equal(sample.frames, reference[k].frames, err_msg=f"clip {k}")
        # AAC's noise substitution draws from one generator per decoder, which the damaged packets advanced: after
        # the damage the noise bands differ by about 1e-5 (a float16 step in a few bins), the rest is identical.
        np.testing.assert_allclose(sample.mel, reference[k].mel, atol=2e-3, rtol=0, err_msg=f"clip {k}")
    assert entries["bitrot"]["samples"] == len(kept)
    lines = [json.loads(line) for line in (out / shards.QUARANTINE_NAME).read_text().splitlines()]
    listed = sorted((q["clip"], q["start"], q["end"], q["reason"]) for q in lines if q["uri"] == uri)
    assert listed == sorted((c["clip"], c["start"], c["end"], c["reason"]) for c in lost)
    assert [(Path(q["uri"]).stem, q["reason"]) for q in lines if "clip" not in q] == [("long_video", "too_long")]
    stats = json.loads((out / shards.STATS_NAME).read_text())["last_run"]
    assert stats["lost_clips"] == {"undecodable_frames": len(lost)} and stats["salvaged"] == 1

    # uhd: frames at 224 equal decord's full-size frames resized by the same resizer
    uhd = _samples_by_clip(out, str(inputs / "uhd.mp4"))
    assert sorted(uhd) == [0]
    vr = decord.VideoReader(str(inputs / "uhd.mp4"), num_threads=1)
    starts = vr.get_frame_timestamp(np.arange(len(vr)))[:, 0]
    idx = clips.frame_indices(clips.frame_times(clips.Clip(0, 0.0, 2.0), 8), starts)
    want = resize_center_crop(vr.get_batch(idx.tolist()).asnumpy(), 224)
    got = uhd[0].frames.astype(np.int16)
    assert np.abs(got - want.astype(np.int16)).mean() < 1.0  # JPEG q90 of flat frames
    assert (uhd[0].record["width"], uhd[0].record["height"]) == (3840, 2160)

    # long_audio: both clips of its 4 s of video, with the silence's spectrogram (the -1 floor after normalising)
    quiet = _samples_by_clip(out, str(inputs / "long_audio.mp4"))
    assert sorted(quiet) == [0, 1] and all(s.mel is not None and s.mel.shape[1] == 128 for s in quiet.values())
    assert all(s.record["mel_frames"] == s.mel.shape[0] > 0 for s in quiet.values())


def test_a_small_decoder_limit_or_tight_caps_quarantine_with_the_reason_and_the_job_goes_on(ray_cluster, media,
                                                                                          tmp_path):
    inputs = _inputs(tmp_path, media, ["clean", "uhd", "long_audio"])
    out = tmp_path / "out"
    code = main([*TINY, "--input", str(inputs), "--output", str(out), "--limits.decoder_memory_gib", "0.3"])
    assert code == 0
    entries = {Path(u).stem: e for u, e in shards.load_manifest(str(out)).sources.items()}
    assert {k: (e["status"], e.get("reason", "")) for k, e in entries.items()} == {
        "clean": ("ok", ""), "long_audio": ("ok", ""), "uhd": ("quarantined", "too_large")}
    assert "limits.decoder_memory_gib" in entries["uhd"]["error"]

    capped = tmp_path / "capped"
    size = (inputs / "long_audio.mp4").stat().st_size
    # two of three inputs over a cap: more than the default failures.max_failed_share, so the run says so (exit 3)
    # after processing everything; a schedule that expects this raises the share
    argv = [*TINY, "--input", str(inputs), "--limits.max_pixels", str(1920 * 1080), "--limits.max_bytes", str(size - 1)]
    assert main([*argv, "--output", str(tmp_path / "strict")]) == 3
    assert main([*argv, "--output", str(capped), "--failures.max_failed_share", "1.0"]) == 0
    entries = {Path(u).stem: e for u, e in shards.load_manifest(str(capped)).sources.items()}
    assert {k: (e["status"], e.get("reason", "")) for k, e in entries.items()} == {
        "clean": ("ok", ""), "long_audio": ("quarantined", "too_large"), "uhd": ("quarantined", "resolution_too_high")}
    assert "limits.max_bytes" in entries["long_audio"]["error"] and "limits.max_pixels" in entries["uhd"]["error"]
