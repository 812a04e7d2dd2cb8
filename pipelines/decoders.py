"""Probing and decoding: the only code that touches native decoders, so it runs inside ``pipelines.sandbox``.

    probe(uri)                 PyAV: container, streams, duration, fps, displayed size, rotation, first frames
                               -> ``dict`` (see ``probe``) or ``Rejected(reason, message)`` raised
    decode_frames(path, times, resize)
                               decord: frames at given instants (rotation applied by decord from the display
                               matrix), clip by clip, resized here -> per clip (T, h, w, 3) uint8 RGB, or None
                               for a clip a damaged packet makes undecodable, or that needs a frame
                               FFmpeg can only conceal once decord met damage in the file (``lost``)
    decode_audio_windows(...)  PyAV: the audio of each clip as float32 mono at its own rate, decoded forward
    release()                  close the reader and the audio stream of the current file

A file is opened once for all the segments of a video (the reader and the audio stream's position are kept until
``release``). Memory stays bounded whatever the file: frames are resized a few at a time where they are decoded,
and audio is held about one clip at a time. Only numpy, PIL, PyAV and decord are imported here: the child stays
small and starts fast.
"""

from __future__ import annotations

import contextlib
import logging
import resource

import av
import decord
import numpy as np
from decord._ffi.base import DECORDError

from pipelines.failures import transient_reason
from pipelines.pinned import open_source
from tvlt_core import clips as clipping
from tvlt_core import media
from tvlt_core.resize import FrameResize
from tvlt_core.uris import is_remote

log = logging.getLogger(__name__)
av.logging.set_level(av.logging.ERROR)


class Rejected(Exception):
    """An input that cannot be used: ``reason`` is a short code for the summary, the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------------- probe
def _open(uri: str, storage_options: dict, stack: contextlib.ExitStack, etag: str, version_id: str):
    if is_remote(uri):
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
LOST_FRAMES = "undecodable_frames"  # a clip lost to damage: decord cannot decode the frames it needs
LOST_CONCEALED = "concealed_frames"  # a clip lost to damage: it needs a frame only error concealment decodes
LOST_AUDIO = "undecodable_audio"  # a clip lost to damage: the decoder refused audio packets inside it
_FRAMES_PER_BATCH = 8  # at most this many frames decoded at once (at source resolution) before they are resized
_BATCH_BYTES = 64 * 1024**2  # and at most this many bytes of them: 2 frames of 4K, 8 of 1080p
_DECODER_FRAMES = 16  # frames an h264 decoder may hold (references + delay), YUV 4:2:0 at 1.5 bytes a pixel
_MEMORY_RESERVE = 64 * 1024**2  # kept free under the limit for the decoders' working buffers


def batch_frames(height: int, width: int) -> int:
    """Frames decoded at once for frames of ``height`` x ``width``."""
    return max(1, min(_FRAMES_PER_BATCH, _BATCH_BYTES // (height * width * 3)))


def _data_bytes() -> int:
    """This process's data segment now (heap and private mappings: what ``RLIMIT_DATA`` limits)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_left() -> float:
    """Bytes this process may still allocate under its memory limit (``RLIMIT_DATA``, set by the sandbox child),
    less a reserve for the decoders' own working buffers; infinite without a limit.

    What would not fit is refused before it is allocated (``too_large``), because the native decoders do not fail
    cleanly where an allocation fails under the limit: decord aborts (``std::bad_alloc``), FFmpeg can segfault."""
    limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    if limit == resource.RLIM_INFINITY:
        return float("inf")
    return limit - _MEMORY_RESERVE - _data_bytes()


def _too_large(what: str, need: float, left: float) -> Rejected:
    limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    return Rejected("too_large", f"{what} needs about {need / 2**20:.0f} MiB; the decoder has "
                                 f"{max(0, left) / 2**20:.0f} MiB left of its {limit / 2**20:.0f} MiB limit "
                                 "(limits.decoder_memory_gib)")


def check_fits(height: int, width: int) -> None:
    """Raise ``Rejected("too_large")`` when decoding frames of ``height`` x ``width`` would not fit (``memory_left``):
    decord's output array and its numpy copy per batch, the resize's working copy, the decoder's own frames."""
    need = 3 * batch_frames(height, width) * height * width * 3 + _DECODER_FRAMES * height * width * 3 // 2
    left = memory_left()
    if need > left:
        raise _too_large(f"decoding {width}x{height} frames", need, left)


class _AudioStream:
    """The first audio stream, decoded forward only as far as the clips asked for so far need: float32 mono at its
    own rate, every sample format through libswresample to planar float first (keeping rate and layout). Holds
    the samples from the earliest start still wanted on, never the whole track.

    A packet the decoder refuses (damage) is skipped: the samples up to the next decoded frame's presentation time
    are zeros, and that range, with the first frame after it (its overlap with the lost one is wrong), is
    ``damaged``, so the clips it touches are lost and the others keep exactly the samples of an undamaged file."""

    def __init__(self, path: str):
        self.container = av.open(path)
        self.stream = self.container.streams.audio[0]
        self.packets = self.container.demux(self.stream)
        self.frames: list = []  # decoded, not yet taken
        self.resampler: av.AudioResampler | None = None
        self.rate, self.offset = 0, 0.0  # sample rate; presentation time of the track's sample 0 (s)
        self.channels = 0
        self.start, self.end = 0, 0  # the chunks hold samples [start, end)
        self.chunks: list[np.ndarray] = []  # float32 (channels, n): planar, made mono per clip (one mean, not many)
        self.damaged: list[tuple[int, int, str]] = []  # [first, last) sample ranges decoded from damage, and why
        self.error = ""  # the decoder's last refusal, not yet placed
        self.ended = False
        self.budget = memory_left()  # bytes of samples it may hold (with a copy of a clip's samples)
        self._pull()  # the first frame fixes rate and offset
        if self.resampler is None:
            self.close()
            raise Rejected("no_audio", "the audio stream holds no samples")

    def _next_frame(self):
        """The next decoded frame, or None at the end; refused packets are noted in ``error`` and skipped."""
        while not self.frames:
            packet = next(self.packets, None)
            if packet is None:
                return None
            try:
                self.frames = list(self.stream.codec_context.decode(packet))
            except av.error.FFmpegError as e:
                if self.resampler is None:
                    raise  # the first packets: nothing to salvage yet (the probe decoded one, so this is rare)
                self.error = str(e)
        return self.frames.pop(0)

    def _place(self, frame) -> None:
        """After refused packets: zeros up to where ``frame`` plays, and the range marked damaged."""
        gap = self.end
        if frame is not None and frame.time is not None:
            at = round((float(frame.time) - self.offset) * self.rate)
            if at > self.end:
                self._append(np.zeros((self.channels, at - self.end), dtype=np.float32))
        last = self.end + (frame.samples if frame is not None else 1 << 62)
        self.damaged.append((gap, last, self.error))
        self.error = ""

    def _append(self, planar: np.ndarray) -> None:
        self.chunks.append(planar)
        self.end += planar.shape[1]
        held = 4 * (2 * self.channels + 1) * (self.end - self.start)  # the chunks, joined, and a clip's mono
        if held > self.budget:
            raise _too_large(f"holding {(self.end - self.start) / self.rate:.0f} s of audio for one clip", held,
                             self.budget)

    def _pull(self) -> None:
        """Decode one more frame (or, at the end, flush the resampler) onto the chunks."""
        frame = self._next_frame()
        if self.error:
            self._place(frame)
        if frame is None:
            out, self.ended = (self.resampler.resample(None) if self.resampler else []), True
        else:
            if self.resampler is None:
                self.offset = float(frame.time) if frame.time is not None else 0.0
                self.resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.sample_rate)
                self.rate, self.channels = frame.sample_rate, len(frame.layout.channels)
            out = self.resampler.resample(frame)
        for f in out:
            self._append(f.to_ndarray())

    def samples(self, first: int, last: int) -> tuple[np.ndarray, str]:
        """Samples [first, last) of the track (fewer where it ends), and why they are damaged ("" if they are
        not). Calls come in increasing order of ``first``: what lies before it is dropped first, so the chunks
        hold one clip's samples."""
        self._drop_before(first)
        while not self.ended and self.end < last:
            self._pull()
        held = np.concatenate(self.chunks, axis=1) if self.chunks else np.zeros((self.channels, 0), np.float32)
        self.chunks = [held] if len(self.chunks) > 1 else self.chunks
        damage = next((why for a, b, why in self.damaged if a < last and b > first), "")
        clip = held[:, max(0, first - self.start) : max(0, last - self.start)]
        return clip.mean(axis=0, dtype=np.float32), damage  # per sample: the same as a whole-track mean

    def _drop_before(self, first: int) -> None:
        while self.chunks and self.start + self.chunks[0].shape[1] <= first:
            self.start += self.chunks.pop(0).shape[1]
        if self.chunks and self.start < first:
            self.chunks[0] = self.chunks[0][:, first - self.start :].copy()
            self.start = first

    def close(self) -> None:
        self.container.close()


class _Current:
    """The file being decoded: its decord reader, frame start times, and its audio stream's position."""

    path: str | None = None
    reader: decord.VideoReader | None = None
    frame_starts: np.ndarray | None = None
    audio: _AudioStream | None = None
    packets: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ``_video_packets``, once damage was met


_current = _Current()


def _reader(path: str) -> tuple[decord.VideoReader, np.ndarray]:
    if _current.path != path:
        release()
        _current.path = path
    if _current.reader is None:
        try:
            _current.reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        except RuntimeError as e:  # decord reports a file it cannot open as a bare RuntimeError
            raise Rejected("undecodable_video", f"decord cannot open it: {e}") from None
        n = len(_current.reader)
        if n == 0:
            raise Rejected("undecodable_video", "decord finds no frames")
        _current.frame_starts = _current.reader.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)
    return _current.reader, _current.frame_starts


def _clip_frames(reader: decord.VideoReader, indices: np.ndarray, resize: FrameResize | None, per_batch: int
                 ) -> np.ndarray:
    """The frames at ``indices`` (increasing), decoded ``per_batch`` distinct frames at a time and resized before
    the next batch is decoded, so at most one batch is held at source resolution."""
    wanted = np.unique(indices)
    done: dict[int, np.ndarray] = {}
    for i in range(0, len(wanted), per_batch):
        part = wanted[i : i + per_batch]
        batch = reader.get_batch(part.tolist()).asnumpy()  # decord seeks to the keyframe before each run of frames
        batch = resize(batch) if resize is not None else batch
        done.update((int(k), frame) for k, frame in zip(part, batch))
    return np.stack([done[int(k)] for k in indices])


def decode_frames(path: str, times: list[list[float]], resize: FrameResize | None = None,
                  frame_size: tuple[int, int] = (1080, 1920), sampling: str = "exact",
                  windows: list[list[float]] | None = None) -> dict:
    """Decode the frames on screen at ``times`` (one list of instants in seconds per clip), resized by ``resize``;
    ``frame_size`` (height, width, from the probe) sizes the batches and the memory check (``check_fits``).
    ``sampling="keyframe"`` decodes instead the keyframe nearest each instant within the clip's ``windows`` entry
    ([start, end] s; ``tvlt_core.media.sampled_indices``): decord then seeks to each and decodes nothing between.

    Returns ``{"frames": [uint8 (T, h, w, 3) per clip, or None for a lost clip], "indices": [[int]],
    "frame_times": [[float]], "lost": {clip position: [reason, error]}}``, frames as displayed (decord applies
    the display matrix's rotation), at source resolution when ``resize`` is None. A clip whose frames decord cannot
    decode (a damaged packet on the way from its keyframe) is lost on its own: the reader is reopened and the next
    clip decodes as if the damage were not there. Once decord met damage in a file, the clips it did decode are
    checked for concealment (``_concealed``) and lost when they needed a concealed packet.
    """
    check_fits(*frame_size)
    per_batch = batch_frames(*frame_size)
    reader, starts = _reader(path)
    per_clip = media.sampled_indices(reader, starts, times, sampling, windows)
    frames, lost = [], {}
    for k, idx in enumerate(per_clip):
        reader, _ = _reader(path)
        try:
            frames.append(_clip_frames(reader, idx, resize, per_batch))
        except DECORDError as e:
            frames.append(None)
            lost[k] = [LOST_FRAMES, f"frames {idx[0]}-{idx[-1]}: {str(e).split('] ')[-1]}"[:500]]
            _current.reader = None  # decord's state after an error is unknown: the next clip reopens the file
    if lost or _current.packets is not None:
        for k, why in _concealed(path, [starts[idx] for idx in per_clip]).items():
            if k not in lost:
                frames[k], lost[k] = None, [LOST_CONCEALED, why]
    return {"frames": frames, "indices": [idx.tolist() for idx in per_clip],
            "frame_times": [starts[idx].round(6).tolist() for idx in per_clip], "lost": lost}


def _video_packets(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pts in s, is keyframe, refused) of every video packet in decode order, decoded by PyAV (FFmpeg 8) on one
    thread with ``err_detect=explode``: a packet whose slices would need concealment is refused instead."""
    pts, keys, refused = [], [], []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # errors belong to the packet that caused them
        stream.codec_context.options = {"err_detect": "explode"}
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            try:
                stream.codec_context.decode(packet)
                bad = False
            except av.error.FFmpegError:
                bad = True
            pts.append(float(packet.pts * packet.time_base))
            keys.append(packet.is_keyframe)
            refused.append(bad)
    return np.array(pts), np.array(keys, dtype=bool), np.array(refused, dtype=bool)


def _concealed(path: str, clip_times: list[np.ndarray]) -> dict[int, str]:
    """Clips (by position) whose decode chain holds a packet FFmpeg would have to conceal: the packets in decode
    order from the last keyframe at or before the clip's first frame to the last of its frames. Scanned once per
    file, only in files where decord met damage (a second decode of every file would double the decode cost)."""
    if _current.packets is None:
        _current.packets = _video_packets(path)
    pts, keys, refused = _current.packets
    out = {}
    for k, times in enumerate(clip_times):
        wanted = np.flatnonzero(np.isin(np.round(pts, 3), np.round(times, 3)))
        starts = np.flatnonzero(keys & (pts <= times.min() + 1e-6))
        if not len(wanted) or not len(starts):
            continue
        chain = slice(starts[-1], wanted.max() + 1)
        if refused[chain].any():
            at = pts[chain][refused[chain]][0]
            out[k] = f"frames at {times.min():.3f}-{times.max():.3f} s need the packet at {at:.3f} s, which FFmpeg " \
                     "can only decode with error concealment"
    return out


def decode_audio_windows(path: str, windows: list[list[float]]) -> dict:
    """The audio of each [start, end] window (seconds, in increasing order of start, also across calls for one
    file): ``{"audio": [float32 (n,) mono], "audio_rate": int, "lost": {position: [reason, error]}}``. The track is
    decoded forward, once per file, as far as the windows reach, so every clip sees exactly the samples a
    whole-file decode gives while the child holds about one clip's audio, never the track. A window that overlaps
    audio the decoder refused (damage) is ``lost`` (its samples hold zeros there)."""
    if _current.path != path:
        release()
        _current.path = path
    stream = _current.audio
    if stream is not None and windows and clipping.sample_range(
            clipping.Clip(0, *windows[0]), stream.rate, stream.offset)[0] < stream.start:
        release()  # asked to go back (the same file again): decode from the start
        _current.path, stream = path, None
    if stream is None:
        stream = _current.audio = _AudioStream(path)
    audio, lost = [], {}
    for k, (s, e) in enumerate(windows):
        samples, damage = stream.samples(*clipping.sample_range(clipping.Clip(0, s, e), stream.rate, stream.offset))
        audio.append(samples)
        if damage:
            lost[k] = [LOST_AUDIO, f"audio {s:.3f}-{e:.3f} s: {damage}"[:500]]
    return {"audio": audio, "audio_rate": stream.rate, "lost": lost}


def release() -> None:
    if _current.audio is not None:
        _current.audio.close()
    _current.path = _current.reader = _current.frame_starts = _current.audio = _current.packets = None


# Errors that mean "this input is bad" (quarantine it), unless ``failures.transient_reason`` finds the store or the
# network behind them (the child asks that first); anything else is a bug and fails the job. decord reports corrupt
# data past the index as DECORDError (a file it cannot open is turned into ``Rejected`` in ``_reader``).
INPUT_ERRORS = (Rejected, DECORDError, av.error.FFmpegError, OSError, EOFError, MemoryError)

# What the sandbox child may run (pipelines.sandbox).
SANDBOXED = {"probe": probe, "decode_frames": decode_frames, "decode_audio_windows": decode_audio_windows,
             "release": release}
