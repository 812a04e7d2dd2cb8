"""Write an mp4 (h264 video via libx264, AAC audio) with PyAV, interleaved like a camera file.

Encoding choices, and why:
- libx264 ``veryfast``: fast to write, yet keeps B-frames and CABAC, so decoders do the work they do on real files.
- A fixed keyframe interval of about 2 s (``keyint = min-keyint``, no scene-cut keyframes): a seek lands at most
  2 s before its target, as with camera files, and the GOP is the same for every file of one fps.
- One encoder thread per file: x264's output is then independent of the machine, and the corpus is parallel
  across files instead. Together with no timestamps in the container, same spec => byte-identical file.
- Audio packets are muxed as soon as the video reaches their time, so the file is interleaved like a real one
  (a reader that wants audio does not seek to the end of the file).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from synthetic.spec import Media

X264_PRESET = "veryfast"
X264_CRF = 23
AAC_BITRATE_PER_CHANNEL = 64_000
_LAYOUTS = {1: "mono", 2: "stereo"}


class _AudioFeed:
    """Cuts a (C, N) float32 signal into encoder-sized frames and muxes them up to a given sample."""

    def __init__(self, container: av.container.OutputContainer, media: Media, audio: np.ndarray):
        if audio.shape != (media.audio_channels, media.n_samples):
            raise ValueError(f"audio shape {audio.shape}, expected {(media.audio_channels, media.n_samples)}")
        self.container, self.audio, self.rate = container, audio.astype(np.float32), media.audio_rate
        self.layout = _LAYOUTS[media.audio_channels]
        # The default "twoloop" coder costs as much CPU as the h264 encoding; "fast" halves it at these bitrates.
        self.stream = container.add_stream("aac", rate=media.audio_rate, layout=self.layout,
                                           options={"aac_coder": "fast"})
        self.stream.bit_rate = AAC_BITRATE_PER_CHANNEL * media.audio_channels
        self.pos = 0

    def until(self, sample: int) -> None:
        """Mux every whole frame ending at or before ``sample``."""
        size = self.stream.codec_context.frame_size or 1024
        while self.pos + size <= min(sample, self.audio.shape[1]):
            self._mux(self.pos + size)

    def finish(self) -> None:
        self.until(self.audio.shape[1])
        if self.pos < self.audio.shape[1]:
            self._mux(self.audio.shape[1])  # AAC accepts a short last frame
        self.container.mux(self.stream.encode(None))

    def _mux(self, end: int) -> None:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(self.audio[:, self.pos:end]), format="fltp",
                                           layout=self.layout)
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self.pos, Fraction(1, self.rate)
        self.container.mux(self.stream.encode(frame))
        self.pos = end


def _video_stream(container: av.container.OutputContainer, media: Media):
    g = media.gop
    stream = container.add_stream("libx264", rate=media.fps, options={
        "preset": X264_PRESET, "crf": str(X264_CRF), "threads": "1",
        "x264-params": f"keyint={g}:min-keyint={g}:scenecut=0",
    })
    stream.width, stream.height, stream.pix_fmt = media.width, media.height, "yuv420p"
    return stream


def write_mp4(path: str | Path, media: Media, frames: Iterable[np.ndarray] | None, audio: np.ndarray | None,
              faststart: bool = False) -> int:
    """Encode ``frames`` ((H * 3 / 2, W) uint8 yuv420p, ``media.n_frames`` of them) and ``audio`` ((C, N) float32) to
    ``path``; either may be None for a file without that stream. ``faststart`` puts the index (moov) before the
    data. Returns the file's size in bytes.

    The file appears under its name only once complete (written next to it, then renamed).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(tmp), mode="w", format="mp4", options=options) as container:
        video = _video_stream(container, media) if frames is not None else None
        feed = _AudioFeed(container, media, audio) if audio is not None else None
        if video is not None:
            for i, yuv in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                frame.pts, frame.time_base = i, Fraction(1, media.fps)
                container.mux(video.encode(frame))
                if feed is not None:
                    feed.until(round((i + 1) * media.audio_rate / media.fps))
            container.mux(video.encode(None))
        if feed is not None:
            feed.finish()
    os.replace(tmp, path)
    return path.stat().st_size
