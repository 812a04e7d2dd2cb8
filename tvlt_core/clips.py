"""Clip sampling: which windows of a video become samples, which instants of a window become frames, and which
decoded frame shows at an instant. Pure functions of numbers, shared by the preprocessing job, serving (a raw video
becomes the same clips as in the shards) and the tests that recompute samples from the source files.

    pretrain    windows [k * stride, k * stride + length] clipped to the duration; a trailing (or only) window
                shorter than ``length`` is kept when it lasts at least ``min_length``. Per window ``frames``
                instants at the centres of equal segments.
    grounding   one window, the whole video, with ``frames`` instants at the segment centres.

An instant t maps to the frame on screen at t: the last frame whose presentation time is <= t. Using presentation
times (not fps * t) keeps variable-frame-rate files right.

Frame sampling (``SAMPLING``, pretraining only):
    exact       the frame on screen at each instant (``frame_indices``): a decoder decodes from the keyframe before
                it through every frame up to it.
    keyframe    the keyframe nearest each instant among the clip's own keyframes (``keyframe_indices``): nothing
                between keyframes is decoded. A clip holding no keyframe falls back to exact for that clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-6


@dataclass(frozen=True)
class Clip:
    index: int
    start: float  # seconds
    end: float  # seconds

    @property
    def length(self) -> float:
        return self.end - self.start


def windows(duration: float, length: float, stride: float, min_length: float) -> list[Clip]:
    """The clips of a ``duration``-second video (empty when even the first window is shorter than min_length)."""
    clips: list[Clip] = []
    k = 0
    while True:
        start = k * stride
        end = min(start + length, duration)
        if end - start < min_length - _EPS:
            break
        clips.append(Clip(k, round(start, 6), round(end, 6)))
        if start + length >= duration - _EPS:
            break
        k += 1
    return clips


def whole(duration: float) -> Clip:
    return Clip(0, 0.0, round(duration, 6))


def frame_times(clip: Clip, n: int) -> np.ndarray:
    """(n,) float64 instants at the centres of ``n`` equal segments of the clip."""
    return clip.start + (np.arange(n) + 0.5) * (clip.length / n)


def frame_indices(times: np.ndarray, frame_starts: np.ndarray) -> np.ndarray:
    """(n,) int64 index of the frame on screen at each instant.

    Args:
        times: (n,) seconds.
        frame_starts: (num_frames,) presentation time of each decoded frame in seconds, non-decreasing.
    """
    idx = np.searchsorted(frame_starts, np.asarray(times) + _EPS, side="right") - 1
    return np.clip(idx, 0, len(frame_starts) - 1).astype(np.int64)


SAMPLING = ("exact", "keyframe")


def keyframe_indices(times: np.ndarray, frame_starts: np.ndarray, key_indices: np.ndarray, window: tuple[float, float]
                     ) -> np.ndarray:
    """(n,) int64 index of the keyframe nearest each instant (the earlier on a tie), among the keyframes that show
    within ``window`` = [start, end) s; where no keyframe does, the exact frames (``frame_indices``).

    Args:
        times: (n,) seconds.
        frame_starts: (num_frames,) presentation time of each frame in seconds, non-decreasing.
        key_indices: indices of the keyframes into ``frame_starts``.
        window: the clip's [start, end) in seconds.
    """
    keys = np.sort(np.asarray(key_indices, dtype=np.int64))
    shown = frame_starts[keys]
    keys = keys[(shown >= window[0] - _EPS) & (shown < window[1] - _EPS)]
    if len(keys) == 0:
        return frame_indices(times, frame_starts)
    key_times = frame_starts[keys]
    times = np.asarray(times, dtype=np.float64)
    after = np.clip(np.searchsorted(key_times, times), 0, len(keys) - 1)
    before = np.clip(after - 1, 0, len(keys) - 1)
    nearer_before = np.abs(times - key_times[before]) <= np.abs(key_times[after] - times) + _EPS
    return np.where(nearer_before, keys[before], keys[after]).astype(np.int64)


def sample_range(clip: Clip, sample_rate: int, offset: float = 0.0) -> tuple[int, int]:
    """[first, last) sample of the clip in an audio track whose sample 0 plays at ``offset`` seconds."""
    return max(0, round((clip.start - offset) * sample_rate)), max(0, round((clip.end - offset) * sample_rate))


def segments(clips: list[Clip], per_segment: int) -> list[list[Clip]]:
    """Consecutive groups of at most ``per_segment`` clips: the unit a decoder emits, bounding a row's memory."""
    return [clips[i : i + per_segment] for i in range(0, len(clips), per_segment)]
