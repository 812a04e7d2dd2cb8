"""TVLT audio and video transforms against the reference processors (transformers, test-only).

Media are generated here: random and tonal signals, and a small h264 + aac mp4 written with PyAV and decoded back,
so the comparison also covers what a real decoder hands the transforms.
"""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from tvlt_core.audio import MAX_FRAMES, NUM_MEL_BINS, SAMPLE_RATE, log_mel, pad_batch, slaney_mel_filter_bank
from tvlt_core.video import normalize, pad_videos, pixel_mask, resize_center_crop

transformers = pytest.importorskip("transformers")

# both compute in float64 and round to float32: about 1e-7 apart on values in [-1, 1]
AUDIO_ATOL = 1e-6


@pytest.fixture(scope="module")
def feature_extractor():
    return transformers.TvltFeatureExtractor()


@pytest.fixture(scope="module")
def image_processor():
    return transformers.TvltImageProcessor()


def _signal(num_samples: int, seed: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Noise plus two tones, with a silent stretch so the 80 dB floor matters."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / rate
    wave = 0.05 * rng.standard_normal(num_samples) + 0.4 * np.sin(2 * np.pi * 440.0 * t)
    wave += 0.2 * np.sin(2 * np.pi * 3000.0 * t + 1.0)
    wave[num_samples // 3 : num_samples // 2] = 0.0
    return wave.astype(np.float32)


def _write_mp4(path, num_frames: int, size: tuple[int, int], audio_seconds: float, rate: int, seed: int) -> None:
    """A small h264 + aac file: moving random blocks and a chirp."""
    rng = np.random.default_rng(seed)
    height, width = size
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=8)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        for i in range(num_frames):
            image = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), dtype=np.uint8))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        t = np.arange(int(audio_seconds * rate)) / rate
        chirp = (0.5 * np.sin(2 * np.pi * (200.0 + 2000.0 * t) * t)).astype(np.float32)
        for start in range(0, chirp.size, 1024):
            chunk = chirp[None, start : start + 1024]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode())


def _decode(path, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 (T, H, W, 3), mono float32 audio at ``rate``) decoded with PyAV."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = [r.to_ndarray()[0] for f in container.decode(audio=0) for r in resampler.resample(f)]
        chunks += [r.to_ndarray()[0] for r in resampler.resample(None)]
    return frames, np.concatenate(chunks).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ audio


@pytest.mark.parametrize("num_samples", [3_000, 44_100, 100_001, 24 * SAMPLE_RATE + 777])
def test_log_mel_matches_reference(feature_extractor, num_samples):
    wave = _signal(num_samples, seed=num_samples)
    expected = feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np")["audio_values"][0, 0]
    ours = log_mel(torch.from_numpy(wave), SAMPLE_RATE)
    assert ours.dtype == torch.float32 and ours.shape[1] == NUM_MEL_BINS
    assert ours.shape[0] == min(num_samples // 512, MAX_FRAMES)
    # the reference pads time to a multiple of 16 with 0; the frames before that are the features
    np.testing.assert_allclose(ours.numpy(), expected[: ours.shape[0]], rtol=0, atol=AUDIO_ATOL)
    assert np.all(expected[ours.shape[0] :] == 0.0)


def test_pad_batch_matches_reference_batch(feature_extractor):
    waves = [_signal(n, seed=n) for n in (20_000, 70_000, 5_000)]
    expected = feature_extractor(waves, sampling_rate=SAMPLE_RATE, return_tensors="np")
    audio_values, audio_mask = pad_batch([log_mel(w, SAMPLE_RATE) for w in waves])
    assert audio_values.shape == expected["audio_values"].shape
    np.testing.assert_allclose(audio_values.numpy(), expected["audio_values"], rtol=0, atol=AUDIO_ATOL)
    np.testing.assert_array_equal(audio_mask.numpy(), expected["audio_mask"])


def test_pad_batch_accepts_float16_shard_arrays():
    spec = log_mel(_signal(30_000, seed=1), SAMPLE_RATE)
    audio_values, audio_mask = pad_batch([spec.numpy().astype(np.float16)])
    assert audio_values.dtype == torch.float32
    torch.testing.assert_close(audio_values[0, 0, : spec.shape[0]], spec, rtol=0, atol=1e-3)
    assert audio_mask.sum().item() == -(-spec.shape[0] // 16) * 8


def test_log_mel_resamples_to_44k(feature_extractor):
    # A band-limited signal generated at 48 kHz, resampled, matches the same signal generated at 44.1 kHz
    # everywhere except the edge frames that see the resampler's boundary.
    seconds = 1.5
    t48 = np.arange(int(48_000 * seconds)) / 48_000
    t44 = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    tone = lambda t: (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 5000 * t)).astype(np.float32)
    ours = log_mel(tone(t48), 48_000)
    expected = feature_extractor(tone(t44), sampling_rate=SAMPLE_RATE, return_tensors="np")["audio_values"][0, 0]
    assert ours.shape[0] == int(SAMPLE_RATE * seconds) // 512
    ours, expected = ours[4:-4].numpy(), expected[4 : ours.shape[0] - 4]
    # Bins carrying the tones agree closely; bins near the 80 dB floor see the resampler's finite stopband.
    loud = expected > -0.5
    assert loud.sum() > 100
    np.testing.assert_allclose(ours[loud], expected[loud], rtol=0, atol=5e-4)
    assert np.abs(ours - expected).mean() < 1e-3


def test_mel_filter_bank_is_torchaudios_in_float64(feature_extractor):
    ours = slaney_mel_filter_bank()
    assert ours.shape == (1025, NUM_MEL_BINS) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), feature_extractor.mel_filters.T, rtol=0, atol=1e-12)
    torchaudio = pytest.importorskip("torchaudio")
    theirs = torchaudio.functional.melscale_fbanks(
        1025, 0.0, SAMPLE_RATE / 2, NUM_MEL_BINS, SAMPLE_RATE, norm="slaney", mel_scale="slaney"
    )
    torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=2e-7)  # torchaudio's own float32 rounding


def test_log_mel_rejects_bad_input():
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.zeros((2, 50_000), dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="too short"):
        log_mel(np.zeros(800, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(TypeError, match="float"):
        log_mel(np.zeros(50_000, dtype=np.int16), SAMPLE_RATE)


def test_log_mel_of_silence_is_the_floor():
    spec = log_mel(np.zeros(20_000, dtype=np.float32), SAMPLE_RATE)
    assert torch.all(spec == -1.0)


# ------------------------------------------------------------------------------------------------------ video


@pytest.mark.parametrize("size", [(360, 640), (480, 360), (224, 224), (100, 150), (301, 257)])
def test_video_transform_matches_reference(image_processor, size):
    frames = np.random.default_rng(sum(size)).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    expected = image_processor(list(frames), return_tensors="np")
    cropped = resize_center_crop(frames)
    assert cropped.dtype == np.uint8 and cropped.shape == (3, 224, 224, 3)
    ours = normalize(cropped)
    assert ours.dtype == torch.float32 and ours.shape == (3, 3, 224, 224)
    np.testing.assert_allclose(ours.numpy(), expected["pixel_values"][0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pixel_mask([3]).numpy(), expected["pixel_mask"])


def test_resize_center_crop_accepts_tensor_and_single_frame():
    frames = np.random.default_rng(0).integers(0, 256, (2, 90, 160, 3), dtype=np.uint8)
    batched = resize_center_crop(torch.from_numpy(frames), size=64)
    assert batched.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(resize_center_crop(frames[1], size=64), batched[1])


def test_pixel_mask_and_padding_match_reference_for_ragged_batch(image_processor):
    rng = np.random.default_rng(3)
    clips = [rng.integers(0, 256, (n, 120, 90, 3), dtype=np.uint8) for n in (2, 5, 1)]
    expected = image_processor([list(c) for c in clips])  # ragged: the reference does not pad pixel values
    pixel_values, mask = pad_videos([normalize(resize_center_crop(c)) for c in clips])
    assert pixel_values.shape == (3, 5, 3, 224, 224)
    np.testing.assert_array_equal(mask.numpy(), np.asarray(expected["pixel_mask"]))
    for i, clip in enumerate(expected["pixel_values"]):
        np.testing.assert_allclose(pixel_values[i, : len(clip)].numpy(), np.stack(clip), rtol=0, atol=1e-6)
        assert torch.all(pixel_values[i, len(clip) :] == 0)
    assert pixel_mask([2, 1], num_frames=8).shape == (2, 8 * 196)
    with pytest.raises(ValueError, match="num_frames"):
        pixel_mask([9], num_frames=8)


# ------------------------------------------------------------------------------------------------ real media


def test_transforms_match_reference_on_decoded_mp4(tmp_path, feature_extractor, image_processor):
    path = tmp_path / "clip.mp4"
    _write_mp4(path, num_frames=8, size=(96, 160), audio_seconds=1.2, rate=SAMPLE_RATE, seed=7)
    frames, audio = _decode(path, rate=SAMPLE_RATE)
    assert frames.shape == (8, 96, 160, 3) and audio.size > SAMPLE_RATE

    expected_audio = feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")["audio_values"][0, 0]
    ours_audio = log_mel(audio, SAMPLE_RATE)
    np.testing.assert_allclose(ours_audio.numpy(), expected_audio[: ours_audio.shape[0]], rtol=0, atol=AUDIO_ATOL)

    expected_frames = image_processor(list(frames), return_tensors="np")["pixel_values"][0]
    ours_frames = normalize(resize_center_crop(frames))
    np.testing.assert_allclose(ours_frames.numpy(), expected_frames, rtol=0, atol=1e-6)


def test_log_mel_of_decoded_48k_audio_is_close_to_44k_decode(tmp_path):
    # The same aac track decoded straight to 48 kHz and resampled by log_mel, or resampled to 44.1 kHz by the
    # decoder: two different resamplers, so only close, not equal.
    path = tmp_path / "clip48.mp4"
    _write_mp4(path, num_frames=2, size=(64, 64), audio_seconds=1.0, rate=48_000, seed=1)
    _, audio48 = _decode(path, rate=48_000)
    _, audio44 = _decode(path, rate=SAMPLE_RATE)
    ours = log_mel(audio48, 48_000)
    reference_rate = log_mel(audio44, SAMPLE_RATE)
    n = min(ours.shape[0], reference_rate.shape[0])
    assert abs(ours.shape[0] - reference_rate.shape[0]) <= 1
    assert (ours[2 : n - 2] - reference_rate[2 : n - 2]).abs().mean() < 0.02
