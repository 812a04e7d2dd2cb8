"""The synthetic corpus generator, checked through real decoders: decord for frames, PyAV for streams and audio.

Most tests read the session corpus of conftest.py (6 pretraining clips, 2 grounding videos, every broken kind);
plan-level tests check the default mix without encoding anything.
"""

from __future__ import annotations

import hashlib
import re
from fractions import Fraction

import av
import decord
import numpy as np
import pytest

from synthetic import BROKEN_KINDS, COLOURS, PITCHES_HZ, class_of, generate_corpus, load_corpus
from synthetic.cli import main
from synthetic.render import TONE_AMPLITUDE, in_intervals
from synthetic.spec import DIM, Overrides, centre_square, grid_frames, plan_grounding, plan_pretrain

# Max minus min channel. The grey background decodes at 0; palette colours reach 140-190 at full brightness and
# 70-95 at half. Where a shape has just vanished, h264 may leave a few ghost pixels of up to about 70.
SATURATION = 50  # any shape pixel, half-bright pretraining shapes included
FULL_SATURATION = 100  # a full-colour shape pixel, above the ghosts
DECORD_ERRORS = (RuntimeError, decord.DECORDError)


def saturated(frames: np.ndarray, threshold: int = SATURATION) -> np.ndarray:
    """(..., H, W, 3) uint8 RGB -> (..., H, W) bool: pixels of a shape."""
    r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]  # channel views: much faster than max(axis=-1)
    return np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b) > threshold  # max >= min: no wrap


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: np.linalg.norm(np.subtract(COLOURS[name], rgb)))


def shape_colour(frame: np.ndarray) -> tuple[str, float]:
    """Palette name nearest the median colour of the frame's shape pixels, and the distance to it."""
    rgb = np.median(frame[saturated(frame)], axis=0)
    name = nearest_colour(rgb)
    return name, float(np.linalg.norm(rgb - COLOURS[name]))


def read_frames(path, indices=None) -> np.ndarray:
    """(T, H, W, 3) uint8 decoded by decord (every frame when ``indices`` is None)."""
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr))) if indices is None else list(indices)).asnumpy()


def read_audio(path) -> tuple[int, int, np.ndarray]:
    """(rate, channels, (C, N) float32) of the first audio stream, decoded by PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate, channels = stream.rate, stream.channels
        chunks = [frame.to_ndarray() for frame in container.decode(stream)]
    return rate, channels, np.concatenate(chunks, axis=1)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def good_videos(corpus):
    return corpus.of_kind("pretrain") + corpus.of_kind("grounding")


# ---------------------------------------------------------------------------------------------------------------
# Streams and layout
# ---------------------------------------------------------------------------------------------------------------


def test_streams_match_the_spec(synthetic_corpus):
    for rec in good_videos(synthetic_corpus):
        path = synthetic_corpus.path(rec)
        vr = decord.VideoReader(str(path))
        assert len(vr) == rec["n_frames"], rec["id"]
        assert vr.get_avg_fps() == pytest.approx(rec["fps"]), rec["id"]
        assert vr[0].shape == (rec["height"], rec["width"], 3), rec["id"]
        # Fixed ~2 s GOP: keyframes exactly every `gop` frames.
        assert rec["gop"] == round(2 * rec["fps"])
        assert list(vr.get_key_indices()) == list(range(0, rec["n_frames"], rec["gop"])), rec["id"]
        with av.open(str(path)) as container:
            assert container.duration / av.time_base == pytest.approx(rec["duration"], abs=0.05), rec["id"]
            assert container.streams.video[0].codec_context.name == "h264"
            assert container.streams.audio[0].codec_context.name == "aac"
        rate, channels, audio = read_audio(path)
        assert (rate, channels) == (rec["audio_rate"], rec["audio_channels"]), rec["id"]
        assert rec["audio_samples"] == round(rec["duration"] * rate)
        # AAC codes 1024-sample frames: the last one is padded, the encoder delay is trimmed by the edit list.
        assert rec["audio_samples"] <= audio.shape[1] < rec["audio_samples"] + 1024, rec["id"]


def test_session_corpus_covers_the_variety(synthetic_corpus):
    recs = good_videos(synthetic_corpus)
    assert {24, 25, 30, 60} <= {r["fps"] for r in recs}
    assert {16000, 44100, 48000} <= {r["audio_rate"] for r in recs}
    assert {1, 2} == {r["audio_channels"] for r in recs}
    assert any(r["height"] > r["width"] for r in recs), "no portrait video"
    assert any((r["width"] // 2) % 2 or (r["height"] // 2) % 2 for r in recs), "no odd-looking size"
    assert all(r["width"] % 2 == 0 and r["height"] % 2 == 0 for r in recs)
    assert synthetic_corpus.path(recs[0]).parent.name == "pretrain"
    assert load_corpus(synthetic_corpus.root).videos == synthetic_corpus.videos


def test_default_mix_spans_the_required_range():
    pretrain = [plan_pretrain(0, i).media for i in range(40)]
    grounding = [plan_grounding(0, i).media for i in range(12)]
    sizes = {(m.width, m.height) for m in pretrain + grounding}
    assert (160, 120) in sizes and (1280, 720) in sizes
    assert min(m.duration for m in pretrain) <= 3 and max(m.duration for m in pretrain) >= 30
    assert all(20 <= m.duration <= 60 for m in grounding)
    # Cheap by default: most clips short and small.
    assert np.median([m.duration for m in pretrain]) <= 8
    assert np.median([m.width * m.height for m in pretrain]) <= 640 * 360


# ---------------------------------------------------------------------------------------------------------------
# Pretraining: the audio-visual correspondence holds in decoded data
# ---------------------------------------------------------------------------------------------------------------


def test_pretrain_pitch_colour_and_flashes_follow_the_class(synthetic_corpus):
    for rec in synthetic_corpus.of_kind("pretrain"):
        colour, shape, pitch = class_of(rec["class"])
        assert (rec["colour"], rec["shape"], rec["pitch_hz"]) == (colour, shape, pitch)
        path = synthetic_corpus.path(rec)

        rate, _, audio = read_audio(path)
        mono = audio.mean(axis=0)
        peak = np.fft.rfftfreq(mono.size, 1 / rate)[np.abs(np.fft.rfft(mono)).argmax()]
        assert min(PITCHES_HZ, key=lambda p: abs(p - peak)) == pitch, rec["id"]
        assert abs(peak - pitch) < 0.01 * pitch, rec["id"]

        frames = read_frames(path)
        mask = saturated(frames)
        assert mask.any(axis=(1, 2)).all(), f"{rec['id']}: a frame without the shape"
        # always inside what TVLT's centre crop keeps (a pixel of slack for chroma subsampling)
        x_lo, y_lo, side = centre_square(frames.shape[2], frames.shape[1])
        _, ys, xs = np.nonzero(mask)
        assert xs.min() >= x_lo - 1 and xs.max() <= x_lo + side and ys.min() >= y_lo - 1 and ys.max() <= y_lo + side, (
            rec["id"], (xs.min(), xs.max(), ys.min(), ys.max()), (x_lo, y_lo, side))
        brightness = np.array([frame[m].max(axis=-1).mean() for frame, m in zip(frames, mask)])
        flash = brightness > (1 + DIM) / 2 * max(rec["rgb"])
        beeps = in_intervals(rec["n_frames"], rec["beeps"])
        assert beeps.any() and not beeps.all(), rec["id"]
        np.testing.assert_array_equal(flash, beeps, err_msg=f"{rec['id']}: flashes off the beep frames")
        for i in np.flatnonzero(flash)[:: max(1, flash.sum() // 5)]:
            name, distance = shape_colour(frames[i])
            assert name == colour and distance < 30, (rec["id"], i, name, distance)

        # The beeps are heard on the frames that flash: audio RMS over each frame's samples. Frames next to a
        # beep edge may go either way (AAC smears an edge over a few milliseconds).
        edges = np.round(np.arange(rec["n_frames"] + 1) * rate / rec["fps"]).astype(int)
        rms = np.array([np.sqrt(np.mean(mono[a:b] ** 2)) for a, b in zip(edges[:-1], edges[1:])])
        loud = rms > TONE_AMPLITUDE / np.sqrt(2) / 2
        edge = np.zeros_like(beeps)
        change = np.flatnonzero(np.diff(beeps.astype(int)))
        edge[change] = edge[np.minimum(change + 1, beeps.size - 1)] = True
        np.testing.assert_array_equal(loud[~edge], beeps[~edge], err_msg=f"{rec['id']}: beeps off the flashes")


# ---------------------------------------------------------------------------------------------------------------
# Grounding: events, annotation files, split
# ---------------------------------------------------------------------------------------------------------------


def _centroid_and_area(mask: np.ndarray) -> tuple[float, float, int]:
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean(), xs.size


def test_grounding_events_match_decoded_frames(synthetic_corpus):
    for rec in synthetic_corpus.of_kind("grounding"):
        assert rec["events"], rec["id"]
        for e in rec["events"]:
            sf, ef = e["start_frame"], e["end_frame"]
            frames = read_frames(synthetic_corpus.path(rec), [sf - 1, sf, (sf + ef) // 2, ef - 1, ef])
            shape = saturated(frames, FULL_SATURATION)
            area = shape.sum(axis=(1, 2))
            min_area = min(e["radius"]) ** 2  # the smallest shape, a triangle, covers 1.3 radius^2
            assert (area[1:4] > min_area).all(), (rec["id"], e["sentence"], area)  # present inside
            # Absent just outside (a ghost pixel that passes the threshold still would not make 5% of a shape).
            assert area[0] < 0.05 * area[1] and area[4] < 0.05 * area[3], (rec["id"], e["sentence"], area)
            assert shape_colour(frames[1])[0] == e["colour"], (rec["id"], e["sentence"])
            assert shape_colour(frames[3])[0] == e["colour_after"], (rec["id"], e["sentence"])

            # The sentence names colour, shape and action, and the action is what the frames show.
            assert f"{e['colour']} {e['shape']}" in e["sentence"]
            x0, y0, a0 = _centroid_and_area(shape[1])
            x1, y1, a1 = _centroid_and_area(shape[3])
            assert abs(x0 - e["path"][0]) < 3 and abs(y1 - e["path"][3]) < 3, (rec["id"], e["sentence"])
            r = e["radius"][0]
            shown = {"moves left": x1 < x0 - 2 * r, "moves right": x1 > x0 + 2 * r, "moves up": y1 < y0 - 2 * r,
                     "moves down": y1 > y0 + 2 * r, "grows": a1 > 2 * a0, "shrinks": a1 < a0 / 2,
                     "turns": e["colour_after"] != e["colour"] and f"turns {e['colour_after']}" in e["sentence"]}
            assert shown[e["action"]], (rec["id"], e["sentence"], (x0, y0, a0), (x1, y1, a1))


ANNOTATION = re.compile(r"^(\S+) (\d+\.\d\d) (\d+\.\d\d)##(.+)$")


def test_annotation_files_are_exact_charades_sta_split_by_video(synthetic_corpus):
    recs = {r["id"]: r for r in synthetic_corpus.of_kind("grounding")}
    ids = {}
    for split in ("train", "test"):
        lines = synthetic_corpus.annotation_file(split).read_text().splitlines()
        parsed = [ANNOTATION.match(line) for line in lines]
        assert all(parsed), lines
        expected = [(vid, f"{e['start']:.2f}", f"{e['end']:.2f}", e["sentence"])
                    for vid, r in recs.items() if r["split"] == split for e in r["events"]]
        assert [m.groups() for m in parsed] == expected
        for vid, start, end, _ in expected:  # two-decimal times land exactly on frames
            fps = recs[vid]["fps"]
            frames = [Fraction(t) * fps for t in (start, end)]
            assert all(f.denominator == 1 for f in frames), (vid, start, end, fps)
            assert [int(f) for f in frames] in ([e["start_frame"], e["end_frame"]] for e in recs[vid]["events"])
        ids[split] = {vid for vid, *_ in expected}
    assert ids["train"] and ids["test"] and not ids["train"] & ids["test"]
    assert ids["train"] | ids["test"] == set(recs)


@pytest.mark.parametrize("fps", [24, 25, 30, 60])
@pytest.mark.parametrize("seconds", [1.0, 7.5, 60.0])
def test_grounding_events_fit_any_forced_duration(fps, seconds):
    for index in range(3):
        spec = plan_grounding(5, index, Overrides(fps=fps, duration=(seconds, seconds)))
        g, n = grid_frames(fps), spec.media.n_frames
        previous_end = 0
        for e in spec.events:
            assert e.start_frame >= previous_end + g and e.end_frame <= n - g
            assert e.start_frame % g == 0 and e.end_frame % g == 0 and e.end_frame > e.start_frame
            assert Fraction(f"{e.start:.2f}") * fps == e.start_frame and Fraction(f"{e.end:.2f}") * fps == e.end_frame
            previous_end = e.end_frame


def test_grounding_too_short_for_an_event_is_refused():
    with pytest.raises(ValueError, match="too short"):
        plan_grounding(0, 0, Overrides(fps=24, duration=(0.25, 0.25)))


def test_default_grounding_events_are_seen_by_48_uniform_frames():
    for index in range(12):
        spec = plan_grounding(0, index)
        sampled = np.round(np.linspace(0, spec.media.n_frames - 1, 48)).astype(int)
        for e in spec.events:
            assert e.end - e.start >= 2.0, (spec.video_id, e.sentence)
            assert ((sampled >= e.start_frame) & (sampled < e.end_frame)).sum() >= 2, (spec.video_id, e.sentence)


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_same_files_whatever_the_corpus_size_and_workers(synthetic_corpus, tmp_path):
    again = generate_corpus(tmp_path / "again", n_pretrain=2, n_grounding=1, seed=synthetic_corpus.seed, workers=1)
    originals = {r["id"]: r for r in synthetic_corpus.videos}
    for rec in again.videos:
        original = originals[rec["id"]]
        assert sha256(again.path(rec)) == sha256(synthetic_corpus.path(original)), rec["id"]
        assert {k: v for k, v in rec.items() if k != "split"} == {k: v for k, v in original.items() if k != "split"}

    other = generate_corpus(tmp_path / "other", n_pretrain=1, seed=synthetic_corpus.seed + 1, workers=1)
    first = other.videos[0]
    assert sha256(other.path(first)) != sha256(synthetic_corpus.path(originals[first["id"]]))


# ---------------------------------------------------------------------------------------------------------------
# Broken files: each is what it claims
# ---------------------------------------------------------------------------------------------------------------


def _check_truncated(path, rec):
    data = path.read_bytes()
    assert data[4:8] == b"ftyp" and b"moov" not in data  # an mp4 that lost its index


def _check_truncated_tail(path, rec):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.frames == rec["n_frames"]  # the index promises every frame...
        decoded = 0
        try:
            for _ in container.decode(stream):
                decoded += 1
        except av.error.InvalidDataError:
            pass  # the packet the cut went through (where the cut lands decides whether a decoder sees it)
    assert 0 < decoded < rec["n_frames"]  # ...the data holds fewer


def _check_zero_bytes(path, rec):
    assert path.stat().st_size == 0


def _check_not_video(path, rec):
    data = path.read_bytes()
    assert data and b"ftyp" not in data


def _check_no_audio(path, rec):
    assert len(decord.VideoReader(str(path))) == rec["n_frames"]


def _check_audio_only(path, rec):
    with pytest.raises(DECORD_ERRORS):
        decord.VideoReader(str(path))
    rate, channels, audio = read_audio(path)
    assert (rate, channels) == (rec["audio_rate"], rec["audio_channels"])
    assert rec["audio_samples"] <= audio.shape[1] < rec["audio_samples"] + 1024


def _check_one_frame(path, rec):
    assert rec["n_frames"] == 1
    assert len(decord.VideoReader(str(path))) == 1


BROKEN_CHECKS = {"truncated": _check_truncated, "truncated_tail": _check_truncated_tail,
                 "zero_bytes": _check_zero_bytes, "not_video": _check_not_video, "no_audio": _check_no_audio,
                 "audio_only": _check_audio_only, "one_frame": _check_one_frame}


def test_every_broken_kind_is_written_once(synthetic_corpus):
    written = [r["broken"] for r in synthetic_corpus.of_kind("broken")]
    assert sorted(written) == sorted(k.name for k in BROKEN_KINDS)


@pytest.mark.parametrize("kind", [k.name for k in BROKEN_KINDS])
def test_broken_file_is_what_it_claims(synthetic_corpus, kind):
    assert kind in BROKEN_CHECKS, f"broken kind {kind!r} has no check in BROKEN_CHECKS"
    (rec,) = [r for r in synthetic_corpus.of_kind("broken") if r["broken"] == kind]
    path = synthetic_corpus.path(rec)
    assert path.suffix == ".mp4" and rec["bytes"] == path.stat().st_size
    if rec["opens"]:
        with av.open(str(path)) as container:
            assert bool(container.streams.video) == rec["has_video"]
            assert bool(container.streams.audio) == rec["has_audio"]
    else:
        with pytest.raises(av.error.FFmpegError):
            av.open(str(path)).close()
        with pytest.raises(DECORD_ERRORS):
            decord.VideoReader(str(path))
    BROKEN_CHECKS[kind](path, rec)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_forces_a_uniform_corpus(tmp_path):
    info = main(["--out", str(tmp_path), "--videos", "1", "--grounding", "1", "--seed", "7", "--size", "1280x720",
                 "--fps", "60", "--duration", "0.5-1", "--audio-rate", "48000", "--workers", "1"])
    assert len(info.of_kind("pretrain")) == 1 and len(info.of_kind("grounding")) == 1
    assert load_corpus(tmp_path).videos == info.videos
    for rec in info.videos:
        assert (rec["width"], rec["height"], rec["fps"], rec["audio_rate"]) == (1280, 720, 60, 48000)
        assert 0.5 <= rec["duration"] <= 1.0
        vr = decord.VideoReader(str(info.path(rec)))
        assert (len(vr), vr[0].shape, vr.get_avg_fps()) == (rec["n_frames"], (720, 1280, 3), 60)
        assert read_audio(info.path(rec))[0] == 48000
    assert info.annotation_file("train").read_text().count("##") == len(info.of_kind("grounding")[0]["events"])


def test_cli_refuses_odd_sizes_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match="even width and height, e.g. 322x178"):
        main(["--out", str(tmp_path), "--videos", "1", "--seed", "0", "--size", "323x179"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--videos", "1", "--seed", "0", "--duration", "ten"])


def test_cli_sets_the_keyframe_interval(tmp_path):
    info = main(["--out", str(tmp_path), "--videos", "1", "--seed", "3", "--size", "64x48", "--fps", "10",
                 "--duration", "6", "--gop", "2.5", "--workers", "1"])
    (rec,) = info.videos
    assert rec["gop"] == 25
    assert list(decord.VideoReader(str(info.path(rec))).get_key_indices()) == [0, 25, 50]
    with pytest.raises(ValueError, match="keyframe interval -1.0 s: must be > 0"):
        Overrides(gop_seconds=-1.0)
