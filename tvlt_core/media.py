"""Reading a video the way preprocessing does, for every caller that starts from a raw file: the preprocessing
decoder child (``pipelines.decoders``) and serving (``tvlt_core.serving``), so a served model sees the frames and
audio its shards were made of.

    local_video(uri)                 -> a local path decord and PyAV open (remote objects downloaded once)
    stream_duration(container, vs)   -> seconds, from the stream, else the container, else frames / fps
    frame_reader(path)               -> (decord reader, (N,) presentation time of every frame in seconds)
    sampled_indices(reader, starts, times, sampling, windows) -> per clip the frame indices to decode (exact/keyframe)
    frames_at(reader, starts, times) -> per clip uint8 (T, H, W, 3) RGB at source resolution, decord's rotation
    decode_audio(path)               -> float32 mono samples at the track's own rate, and the time of sample 0

Only numpy, fsspec, PyAV and decord are imported (the decoders when first used): the preprocessing child that
imports this stays small.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import fsspec
import numpy as np

from tvlt_core import clips as clipping
from tvlt_core.uris import is_remote, local_path


def download(uri: str, folder: str, storage_options: dict | None = None) -> str:
    """Copy the object at ``uri`` into ``folder`` (keeping its extension); returns the local path."""
    path = os.path.join(folder, "source" + os.path.splitext(uri.split("?", 1)[0])[1])
    with fsspec.open(uri, "rb", **(storage_options or {})) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 22)
    return path


@contextlib.contextmanager
def local_video(uri: str, storage_options: dict | None = None, scratch_dir: str = "") -> Iterator[str]:
    """A local path for ``uri``: the file itself, or a copy of a remote object (``s3://``, ``https://``, any
    fsspec URL; endpoint and credentials from the environment or ``storage_options``) deleted on exit."""
    if not is_remote(uri):
        yield local_path(uri)
        return
    folder = tempfile.mkdtemp(prefix="video-", dir=scratch_dir or None)
    try:
        yield download(uri, folder, storage_options)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def stream_duration(container, stream) -> float:
    """A video's duration in seconds as preprocessing records it (0.0 when nothing gives one)."""
    fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        import av

        return container.duration / av.time_base
    return stream.frames / fps if stream.frames and fps else 0.0


def frame_reader(path: str):
    """A decord reader of ``path`` and the (N,) presentation time (s) of each of its frames; the caller checks
    for an empty reader (``len(reader) == 0``)."""
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    n = len(reader)
    starts = reader.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64) if n else np.zeros(0)
    return reader, starts


def sampled_indices(reader, starts: np.ndarray, times: list[list[float]], sampling: str = "exact",
                    windows: list[tuple[float, float]] | None = None) -> list[np.ndarray]:
    """Per clip, the indices of the frames to decode for its instants ``times``: the frames on screen
    (``clips.frame_indices``), or with ``sampling="keyframe"`` the keyframes nearest them within the clip's
    ``windows`` entry (``clips.keyframe_indices``, the reader's keyframe index)."""
    if sampling == "keyframe":
        keys = reader.get_key_indices()
        return [clipping.keyframe_indices(np.asarray(t, dtype=np.float64), starts, keys, (w[0], w[1]))
                for t, w in zip(times, windows, strict=True)]  # fmt: skip
    return [clipping.frame_indices(np.asarray(t, dtype=np.float64), starts) for t in times]


def frames_at(reader, starts: np.ndarray, times: list[list[float]], sampling: str = "exact",
              windows: list[tuple[float, float]] | None = None) -> dict:
    """The frames on screen at ``times`` (one list of instants in seconds per clip); with ``sampling="keyframe"``
    the keyframe nearest each instant within the clip's ``windows`` entry (``clips.keyframe_indices``).

    Returns ``{"frames": [uint8 (T, H, W, 3) per clip], "indices": [[int]], "frame_times": [[float]]}``, H and W
    as displayed (decord applies the display matrix's rotation).
    """
    per_clip = sampled_indices(reader, starts, times, sampling, windows)
    wanted = np.unique(np.concatenate(per_clip))
    batch = reader.get_batch(wanted.tolist()).asnumpy()  # decord seeks to the keyframe before each run of frames
    row = {int(i): k for k, i in enumerate(wanted)}
    return {"frames": [batch[[row[int(i)] for i in idx]] for idx in per_clip],
            "indices": [idx.tolist() for idx in per_clip],
            "frame_times": [starts[idx].round(6).tolist() for idx in per_clip]}  # fmt: skip


class NoAudio(ValueError):
    """The audio stream holds no samples."""


def decode_audio(path: str) -> tuple[np.ndarray, int, float]:
    """The first audio stream as float32 mono (mean of the channels) at its own rate.

    Returns (samples (N,), sample rate, presentation time of sample 0 in seconds). Every sample format (u8, s16,
    float, planar or packed) goes through libswresample to planar float first, keeping rate and layout.
    Raises IndexError when there is no audio stream, ``NoAudio`` when it holds no samples.
    """
    import av

    with av.open(path) as container:
        stream = container.streams.audio[0]
        resampler, chunks, offset = None, [], None
        for frame in container.decode(stream):
            if offset is None:
                offset = float(frame.time) if frame.time is not None else 0.0
            if resampler is None:
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.sample_rate)
                rate = frame.sample_rate
            chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
        if resampler is None:
            raise NoAudio("the audio stream holds no samples")
        chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    samples = np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float32)
    return samples, rate, offset or 0.0
