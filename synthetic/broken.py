"""Files a real bucket holds besides good videos: truncated uploads, empty objects, error pages saved as .mp4,
files missing a stream, a one-frame clip.

Each kind is one ``BrokenKind`` in ``BROKEN_KINDS``: a name, what a reader runs into, which streams a demuxer finds,
and a writer. To add a kind (rotated stream metadata, variable frame rate, 8 kHz 8-bit audio, ...), write one
function ``_write_x(path, spec)`` and append one entry; give ``plan`` when the kind changes the source's streams
(as ``one_frame`` does), so corpus.json records what was really written. tests/test_synthetic.py holds one check
per kind and fails for a kind without one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from synthetic.mp4 import write_mp4
from synthetic.render import pretrain_audio, pretrain_frames
from synthetic.spec import Profile, VideoSpec, pretrain_spec, rng_for

# Source of every broken file: a small, short, valid clip.
SOURCE_PROFILE = Profile(160, 120, 25, (2.0, 2.0), 16000, 1)


def _same(spec: VideoSpec) -> VideoSpec:
    return spec


@dataclass(frozen=True)
class BrokenKind:
    """``opens``: a demuxer (PyAV, decord) opens the file; ``video``/``audio``: the streams it then finds."""

    name: str
    expect: str
    opens: bool
    video: bool
    audio: bool
    write: Callable[[Path, VideoSpec], None]
    plan: Callable[[VideoSpec], VideoSpec] = _same

    def facts(self) -> dict:
        return {"broken": self.name, "expect": self.expect, "opens": self.opens, "has_video": self.video,
                "has_audio": self.audio}


def _write_full(path: Path, spec: VideoSpec, faststart: bool = False) -> None:
    write_mp4(path, spec.media, pretrain_frames(spec), pretrain_audio(spec), faststart=faststart)


def _cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def _write_truncated(path: Path, spec: VideoSpec) -> None:
    # moov (the index) is written last, so an upload cut halfway has media data and no index at all.
    _write_full(path, spec)
    _cut(path, 0.5)


def _write_truncated_tail(path: Path, spec: VideoSpec) -> None:
    # A "fast start" file keeps its index up front: it opens and promises every frame, but the data ends early.
    _write_full(path, spec, faststart=True)
    _cut(path, 0.6)


def _write_zero_bytes(path: Path, spec: VideoSpec) -> None:
    path.write_bytes(b"")


def _write_not_video(path: Path, spec: VideoSpec) -> None:
    # What a download of a private object saves: the store's error document.
    path.write_bytes(b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                     b"<Message>Access Denied</Message><RequestId>" + spec.video_id.encode()
                     + b"</RequestId></Error>\n")


def _write_no_audio(path: Path, spec: VideoSpec) -> None:
    write_mp4(path, spec.media, pretrain_frames(spec), None)


def _write_audio_only(path: Path, spec: VideoSpec) -> None:
    write_mp4(path, spec.media, None, pretrain_audio(spec))


def _one_frame(spec: VideoSpec) -> VideoSpec:
    beeps = tuple((a, min(b, 1)) for a, b in spec.clip.beeps if a < 1)
    return replace(spec, media=replace(spec.media, n_frames=1), clip=replace(spec.clip, beeps=beeps))


BROKEN_KINDS: tuple[BrokenKind, ...] = (
    BrokenKind("truncated", "cut mid-file before its index (moov): no demuxer opens it", False, False, False,
               _write_truncated),
    BrokenKind("truncated_tail", "index up front, data cut at 60%: opens, then frames run out", True, True, True,
               _write_truncated_tail),
    BrokenKind("zero_bytes", "empty object", False, False, False, _write_zero_bytes),
    BrokenKind("not_video", "an XML error document saved with a .mp4 name", False, False, False, _write_not_video),
    BrokenKind("no_audio", "valid h264 video, no audio stream", True, True, False, _write_no_audio),
    BrokenKind("audio_only", "valid AAC audio in an mp4, no video stream", True, False, True, _write_audio_only),
    BrokenKind("one_frame", "valid video of a single frame (and 1/fps s of audio)", True, True, True,
               _write_full, plan=_one_frame),
)
BY_NAME: dict[str, BrokenKind] = {k.name: k for k in BROKEN_KINDS}


def plan_broken(seed: int) -> list[VideoSpec]:
    """One spec per broken kind, each from its own small source clip."""
    specs = []
    for i, kind in enumerate(BROKEN_KINDS):
        base = pretrain_spec(f"broken_{kind.name}", "broken", f"broken/{kind.name}.mp4", SOURCE_PROFILE,
                             rng_for(seed, "broken", i))
        specs.append(kind.plan(replace(base, broken=kind.name)))
    return specs


def write_broken(path: Path, spec: VideoSpec) -> None:
    BY_NAME[spec.broken].write(path, spec)
