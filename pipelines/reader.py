"""Probing and decoding: the only code that touches native decoders, so it runs inside ``pipelines.sandbox``.

    probe(uri)                 PyAV: container, streams, duration, fps, displayed size, rotation, first frames
                               -> ``dict`` (see ``probe``) or ``Rejected(reason, message)`` raised
    decode_frames(path, times) decord: frames at given instants (rotation applied by decord from the display
                               matrix) -> per clip (T, H, W, 3) uint8 RGB at source resolution
    decode_audio_windows(...)  PyAV: the audio track as float32 mono at its own rate, sliced per clip
    release()                  drop the cached reader and audio of the current file

A file is opened once for all the segments of a video (the reader and the decoded audio track are cached until
``release``). Only numpy, PyAV and decord are imported here (and ``tvlt_core.media``, which shares the decoding with serving):
the child stays small and starts fast.
"""

from __future__ import annotations

import contextlib
import logging

import av
import decord
import fsspec
import numpy as np
from decord._ffi.base import DECORDError

from tvlt_core import clips as clipping
from tvlt_core import media

log = logging.getLogger(__name__)
av.logging.set_level(av.logging.ERROR)


class Rejected(Exception):
    """An input that cannot be used: ``reason`` is a short code for the summary, the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------------- probe
def _open(uri: str, storage_options: dict, stack: contextlib.ExitStack):
    if "://" in uri and not uri.startswith("file://"):
        # Range reads: the probe touches the index and the first packets, not the whole object.
        return av.open(stack.enter_context(fsspec.open(uri, "rb", **storage_options)), metadata_errors="ignore")
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


def probe(uri: str, storage_options: dict | None = None, want_audio: bool = True) -> dict:
    """Streams and timing of a video, checking that its first video (and audio) frame decodes.

    Returns ``{"duration", "fps", "width", "height", "rotation", "video_codec", "frames", "container", "audio",
    "audio_problem"}``: width/height as displayed (after rotation), ``audio`` None when there is no decodable audio.
    Raises ``Rejected`` for inputs that cannot become samples.
    """
    with contextlib.ExitStack() as stack:
        return _probe(uri, storage_options or {}, want_audio, stack)


def _probe(uri: str, storage_options: dict, want_audio: bool, stack: contextlib.ExitStack) -> dict:
    try:
        container = _open(uri, storage_options, stack)
    except FileNotFoundError as e:
        raise Rejected("unreadable", f"object not found ({e})") from None
    except PermissionError as e:
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
        duration = media.stream_duration(container, vstream)
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
        _current.reader, _current.frame_starts = media.frame_reader(path)
        if len(_current.reader) == 0:
            raise Rejected("undecodable_video", "decord finds no frames")
        _current.path = path
    return _current.reader, _current.frame_starts


def decode_audio(path: str) -> tuple[np.ndarray, int, float]:
    """``tvlt_core.media.decode_audio``; an audio stream without samples is a rejected input."""
    try:
        return media.decode_audio(path)
    except media.NoAudio as e:
        raise Rejected("no_audio", str(e)) from None


def decode_frames(path: str, times: list[list[float]]) -> dict:
    """Decode the frames on screen at ``times`` (one list of instants in seconds per clip): see
    ``tvlt_core.media.frames_at``."""
    return media.frames_at(*_reader(path), times)


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


# Errors that mean "this input is bad" (quarantine it); anything else is a bug and fails the job.
# decord reports a file it cannot open as RuntimeError, and corrupt data past the index as DECORDError.
INPUT_ERRORS = (Rejected, DECORDError, av.error.FFmpegError, RuntimeError, OSError, EOFError, MemoryError)

# What the sandbox child may run (pipelines.sandbox).
SANDBOXED = {"probe": probe, "decode_frames": decode_frames, "decode_audio_windows": decode_audio_windows,
             "release": release}
