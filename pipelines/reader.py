"""Probing and decoding: the only code that touches native decoders, so it runs inside ``pipelines.sandbox``.

    probe(uri)                 PyAV: container, streams, duration, fps, displayed size, rotation, first frames
                               -> ``dict`` (see ``probe``) or ``Rejected(reason, message)`` raised
    decode_frames(path, times) decord: frames at given instants (rotation applied by decord from the display
                               matrix) -> per clip (T, H, W, 3) uint8 RGB at source resolution
    decode_audio_windows(...)  PyAV: the audio track as float32 mono at its own rate, sliced per clip
    release()                  drop the cached reader and audio of the current file

A file is opened once for all the segments of a video (the reader and the decoded audio track are cached until
``release``). Only numpy, PyAV and decord are imported here: the child stays small and starts fast.
"""

from __future__ import annotations

import contextlib
import logging

import av
import decord
import numpy as np
from decord._ffi.base import DECORDError

from pipelines import clips as clipping
from pipelines.failures import transient_reason
from pipelines.pinned import open_source

log = logging.getLogger(__name__)
av.logging.set_level(av.logging.ERROR)


class Rejected(Exception):
    """An input that cannot be used: ``reason`` is a short code for the summary, the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------------- probe
def _open(uri: str, storage_options: dict, stack: contextlib.ExitStack, etag: str, version_id: str):
    if "://" in uri and not uri.startswith("file://"):
        # Range reads: the probe touches the index and the first packets, not the whole object, of the version
        # the listing saw (``pinned``).
        source = stack.enter_context(open_source(uri, storage_options, etag, version_id))
        return av.open(source, metadata_errors="ignore")
    return av.open(uri, metadata_errors="ignore")


def _first_frame(container, stream):
    for frame in container.decode(stream):
        return frame
    return None


def _audio_facts(container, stream) -> tuple[dict | None, str]:
    """(facts, problem): facts of the first decodable audio frame, or None and why there is none."""
    try:
        frame = _first_frame(container, stream)
    except av.error.FFmpegError as e:
        return None, f"audio stream cannot be decoded: {e}"
    if frame is None:
        return None, "audio stream holds no samples"
    return {"sample_rate": frame.sample_rate, "channels": len(frame.layout.channels),
            "codec": stream.codec_context.name, "sample_format": frame.format.name}, ""


def probe(uri: str, storage_options: dict | None = None, want_audio: bool = True, etag: str = "",
          version_id: str = "") -> dict:
    """Streams and timing of a video, checking that its first video (and audio) frame decodes.

    Returns ``{"duration", "fps", "width", "height", "rotation", "video_codec", "frames", "container", "audio",
    "audio_problem"}``: width/height as displayed (after rotation), ``audio`` None when there is no decodable audio.
    Raises ``Rejected`` for inputs that cannot become samples, ``failures.SourceChanged`` when a remote object is
    no longer at the listed ``etag``/``version_id``.
    """
    with contextlib.ExitStack() as stack:
        return _probe(uri, storage_options or {}, want_audio, stack, etag, version_id)


def _probe(uri: str, storage_options: dict, want_audio: bool, stack: contextlib.ExitStack, etag: str,
           version_id: str) -> dict:
    try:
        container = _open(uri, storage_options, stack, etag, version_id)
    except FileNotFoundError as e:
        raise Rejected("unreadable", f"object not found ({e})") from None
    except PermissionError as e:
        if transient_reason(e):  # the store rejected the credential: not this input's fault
            raise
        raise Rejected("unreadable", f"no permission to read the object ({e})") from None
    except av.error.FFmpegError as e:
        raise Rejected("not_a_video", f"no demuxer recognises it: {e}") from None
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise Rejected("no_video_stream", f"the container has no video stream (streams: {kinds})")
        vstream = container.streams.video[0]
        try:
            frame = _first_frame(container, vstream)
        except av.error.FFmpegError as e:
            raise Rejected("undecodable_video", f"first video frame does not decode: {e}") from None
        if frame is None:
            raise Rejected("undecodable_video", "the video stream holds no frames")
        rotation = int(round(frame.rotation or 0)) % 360
        width, height = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
        fps = float(vstream.average_rate or vstream.guessed_rate or 0.0)
        if vstream.duration and vstream.time_base:
            duration = float(vstream.duration * vstream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = vstream.frames / fps if vstream.frames and fps else 0.0
        if duration <= 0:
            raise Rejected("unknown_duration", "neither the stream nor the container gives a duration")
        audio, problem = None, "no audio stream"
        if want_audio and container.streams.audio:
            container.seek(0)
            audio, problem = _audio_facts(container, container.streams.audio[0])
        return {"duration": round(duration, 6), "fps": round(fps, 6), "width": width, "height": height,
                "rotation": rotation, "video_codec": vstream.codec_context.name, "frames": int(vstream.frames or 0),
                "container": container.format.name, "audio": audio, "audio_problem": "" if audio else problem}


# -------------------------------------------------------------------------------------------------------- decode
class _Current:
    """The file being decoded: its decord reader, frame start times, and its decoded audio track."""

    path: str | None = None
    reader: decord.VideoReader | None = None
    frame_starts: np.ndarray | None = None
    audio: tuple[np.ndarray, int, float] | None = None  # (samples (N,) float32 mono, rate, time of sample 0)


_current = _Current()


def _reader(path: str) -> tuple[decord.VideoReader, np.ndarray]:
    if _current.path != path or _current.reader is None:
        if _current.path != path:
            release()
        try:
            _current.reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        except RuntimeError as e:  # decord reports a file it cannot open as a bare RuntimeError
            raise Rejected("undecodable_video", f"decord cannot open it: {e}") from None
        n = len(_current.reader)
        if n == 0:
            raise Rejected("undecodable_video", "decord finds no frames")
        _current.frame_starts = _current.reader.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)
        _current.path = path
    return _current.reader, _current.frame_starts


def decode_audio(path: str) -> tuple[np.ndarray, int, float]:
    """The first audio stream as float32 mono (mean of the channels) at its own rate.

    Returns (samples (N,), sample rate, presentation time of sample 0 in seconds). Every sample format (u8, s16,
    float, planar or packed) goes through libswresample to planar float first, keeping rate and layout.
    """
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
            raise Rejected("no_audio", "the audio stream holds no samples")
        chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    samples = np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float32)
    return samples, rate, offset or 0.0


def decode_frames(path: str, times: list[list[float]]) -> dict:
    """Decode the frames on screen at ``times`` (one list of instants in seconds per clip).

    Returns ``{"frames": [uint8 (T, H, W, 3) per clip], "indices": [[int]], "frame_times": [[float]]}``, H and W
    as displayed (decord applies the display matrix's rotation).
    """
    reader, starts = _reader(path)
    per_clip = [clipping.frame_indices(np.asarray(t, dtype=np.float64), starts) for t in times]
    wanted = np.unique(np.concatenate(per_clip))
    batch = reader.get_batch(wanted.tolist()).asnumpy()  # decord seeks to the keyframe before each run of frames
    row = {int(i): k for k, i in enumerate(wanted)}
    return {"frames": [batch[[row[int(i)] for i in idx]] for idx in per_clip],
            "indices": [idx.tolist() for idx in per_clip],
            "frame_times": [starts[idx].round(6).tolist() for idx in per_clip]}


def decode_audio_windows(path: str, windows: list[list[float]]) -> dict:
    """The audio of each [start, end] window (seconds): ``{"audio": [float32 (n,) mono], "audio_rate": int}``.
    The track is decoded once per file and sliced, so every clip sees exactly the samples a whole-file decode
    gives."""
    if _current.path != path or _current.audio is None:
        if _current.path != path:
            release()
            _current.path = path
        _current.audio = decode_audio(path)
    samples, rate, offset = _current.audio
    windows_ = [clipping.sample_range(clipping.Clip(0, s, e), rate, offset) for s, e in windows]
    return {"audio": [samples[a:b].copy() for a, b in windows_], "audio_rate": rate}


def release() -> None:
    _current.path = _current.reader = _current.frame_starts = _current.audio = None


# Errors that mean "this input is bad" (quarantine it), unless ``failures.transient_reason`` finds the store or the
# network behind them (the child asks that first); anything else is a bug and fails the job. decord reports corrupt
# data past the index as DECORDError (a file it cannot open is turned into ``Rejected`` in ``_reader``).
INPUT_ERRORS = (Rejected, DECORDError, av.error.FFmpegError, OSError, EOFError, MemoryError)

# What the sandbox child may run (pipelines.sandbox).
SANDBOXED = {"probe": probe, "decode_frames": decode_frames, "decode_audio_windows": decode_audio_windows,
             "release": release}
