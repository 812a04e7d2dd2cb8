"""TVLT audio features: mono waveform -> normalised log-mel spectrogram, and batching with ``audio_mask``.

The recipe is the one the public TVLT checkpoints were trained with (and that ``TvltFeatureExtractor`` computes):

    waveform (samples,) at any rate
      -> resample to 44.1 kHz (torchaudio's windowed-sinc resampler)
      -> |STFT|^2: periodic Hann 2048, hop 512, centre frames with reflect padding
      -> 128 slaney mel bins (slaney area norm, 0 to 22.05 kHz)
      -> 10 * log10(max(mel, 1e-10)), then floored at (maximum over the whole clip) - 80 dB
      -> drop the last frame, clip((dB - 20) / 40, -2, 0) + 1, keep at most 2048 frames
    = spectrogram (time, 128) float32 in [-1, 1]; one frame is 512 / 44100 s (11.6 ms)

Batching (``pad_batch``) pads time with 0 to a multiple of the time patch (16 frames) and marks real patches
in ``audio_mask`` (B, num_time_patches * 128 // 16), time-major, the order the model flattens patches in.

The STFT, mel projection and log run in float64 like the reference's numpy code: in float32 the FFT's rounding
noise of a loud clip reaches bins 60 dB down (2e-5 after normalisation); in float64 the two agree to about 2e-7.
That costs a few milliseconds per clip, next to hundreds for decoding it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torchaudio

from tvlt_core.input_spec import HOP_LENGTH, MAX_FRAMES, N_FFT, NUM_MEL_BINS, SAMPLE_RATE  # noqa: F401  (re-exported)
TIME_PATCH = 16  # audio_patch_size[0]
FREQ_PATCH = 16  # audio_patch_size[1]
POWER_FLOOR = 1e-10  # -100 dB
TOP_DB = 80.0


def _hz_to_slaney_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above."""
    linear = hz / (200.0 / 3.0)
    log_part = 15.0 + torch.log(hz.clamp_min(1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz >= 1000.0, log_part, linear)


def _slaney_mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    linear = mel * (200.0 / 3.0)
    log_part = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return torch.where(mel >= 15.0, log_part, linear)


def slaney_mel_filter_bank(
    num_freq_bins: int = N_FFT // 2 + 1,
    num_mels: int = NUM_MEL_BINS,
    sample_rate: int = SAMPLE_RATE,
) -> torch.Tensor:
    """(num_freq_bins, num_mels) float64 triangular filters on the slaney mel scale with slaney area norm.

    The same construction as ``torchaudio.functional.melscale_fbanks(..., norm="slaney", mel_scale="slaney")``,
    but in float64: torchaudio builds it in float32, which puts up to 0.5% relative error on the small edge weights
    of some triangles and about 1e-5 on the normalised output.
    """
    fft_freqs = torch.linspace(0.0, sample_rate // 2, num_freq_bins, dtype=torch.float64)
    mel_max = _hz_to_slaney_mel(torch.tensor(sample_rate / 2, dtype=torch.float64))
    mel_points = torch.linspace(0.0, float(mel_max), num_mels + 2, dtype=torch.float64)
    edges = _slaney_mel_to_hz(mel_points)  # (num_mels + 2,) lower, centre, upper of each triangle
    widths = edges[1:] - edges[:-1]
    slopes = edges[None, :] - fft_freqs[:, None]  # (freq, num_mels + 2)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    filters = torch.minimum(rising, falling).clamp_min(0.0)
    return filters * (2.0 / (edges[2:] - edges[:-2]))  # equal area per filter


@functools.lru_cache(maxsize=8)
def _stft_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(window (N_FFT,), mel filter bank (N_FFT // 2 + 1, NUM_MEL_BINS)), float64 on ``device``, built once."""
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64, device=device)
    return window, slaney_mel_filter_bank().to(device)


def _as_mono_float64(waveform: torch.Tensor | np.ndarray) -> torch.Tensor:
    wave = torch.as_tensor(waveform)
    if wave.dim() != 1:
        raise ValueError(f"log_mel expects a mono waveform of shape (samples,), got {tuple(wave.shape)}")
    if not wave.is_floating_point():
        raise TypeError(f"log_mel expects float samples in [-1, 1], got dtype {wave.dtype}")
    return wave.to(torch.float64)


def log_mel(
    waveform: torch.Tensor | np.ndarray,
    sample_rate: int,
    *,
    max_frames: int = MAX_FRAMES,
) -> torch.Tensor:
    """Normalised TVLT log-mel spectrogram of one mono clip.

    Args:
        waveform: (samples,) float samples in [-1, 1], at ``sample_rate`` Hz.
        sample_rate: rate of ``waveform`` in Hz; anything but 44100 is resampled first.
        max_frames: keep at most this many frames (the model's ``spectrogram_length``).

    Returns:
        (time, 128) float32 in [-1, 1], time = min(samples_at_44.1k // 512, max_frames), on the waveform's device.
        The 80 dB floor is taken over the whole clip before truncation, as the reference does.
    """
    wave = _as_mono_float64(waveform)
    if sample_rate != SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, orig_freq=int(sample_rate), new_freq=SAMPLE_RATE)
    # reflect padding needs more samples than it pads (N_FFT // 2 on each side)
    if wave.numel() <= N_FFT // 2:
        raise ValueError(
            f"clip too short for a log-mel frame: {wave.numel()} samples at {SAMPLE_RATE} Hz, need > {N_FFT // 2}"
        )
    window, mel_fb = _stft_constants(wave.device)
    spec = torch.stft(
        wave,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        win_length=N_FFT,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )  # (1025, frames)
    power = spec.real.square() + spec.imag.square()
    mel = power.T @ mel_fb  # (frames, 128)
    db = 10.0 * torch.log10(mel.clamp_min(POWER_FLOOR))
    db = db.clamp_min(db.max() - TOP_DB)
    db = db[:-1]  # the reference drops the last (centre-padded) frame
    return ((db - 20.0) / 40.0).clamp(-2.0, 0.0).add(1.0)[:max_frames].to(torch.float32)


def min_samples(rate: int) -> int:
    """Fewest samples at ``rate`` that still give one spectrogram frame at 44.1 kHz (reflect padding needs more
    than N_FFT / 2): a shorter clip gets no spectrogram."""
    return int(np.ceil((N_FFT // 2 + 1) * rate / SAMPLE_RATE)) + 1


def num_audio_patches(num_frames: int, *, time_patch: int = TIME_PATCH, freq_patch: int = FREQ_PATCH) -> int:
    """Patches the model sees for a spectrogram of ``num_frames`` frames after padding to whole time patches."""
    return math.ceil(num_frames / time_patch) * (NUM_MEL_BINS // freq_patch)


def pad_batch(
    spectrograms: Sequence[torch.Tensor | np.ndarray],
    *,
    time_patch: int = TIME_PATCH,
    freq_patch: int = FREQ_PATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack spectrograms of different lengths into the model's audio inputs.

    Args:
        spectrograms: B tensors (time_i, 128), e.g. from ``log_mel`` (float16 from a shard is fine).

    Returns:
        audio_values: (B, 1, T, 128) float32, T = the longest time_i rounded up to a multiple of ``time_patch``,
            zero after each clip's end (0 is what the reference pads with).
        audio_mask: (B, T // time_patch * 128 // freq_patch) float32, 1 for patches that hold any real frame,
            time-major (patch index t * (128 // freq_patch) + f).
    """
    if len(spectrograms) == 0:
        raise ValueError("pad_batch needs at least one spectrogram")
    specs = [torch.as_tensor(s) for s in spectrograms]
    for i, s in enumerate(specs):
        if s.dim() != 2 or s.shape[1] != NUM_MEL_BINS or s.shape[0] == 0:
            raise ValueError(f"spectrogram {i} has shape {tuple(s.shape)}, expected (time > 0, {NUM_MEL_BINS})")
    patches = [num_audio_patches(s.shape[0], time_patch=time_patch, freq_patch=freq_patch) for s in specs]
    max_patches = max(patches)
    max_time = max_patches // (NUM_MEL_BINS // freq_patch) * time_patch
    audio_values = torch.zeros(len(specs), 1, max_time, NUM_MEL_BINS, dtype=torch.float32)
    audio_mask = torch.zeros(len(specs), max_patches, dtype=torch.float32)
    for i, (s, n) in enumerate(zip(specs, patches)):
        audio_values[i, 0, : s.shape[0]] = s.to(torch.float32)
        audio_mask[i, :n] = 1.0
    return audio_values, audio_mask
