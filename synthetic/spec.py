"""What each synthetic file contains, decided from the seed before a single pixel is drawn.

Every file's spec is a pure function of ``(seed, kind, index)`` (its own ``numpy`` generator), so the same seed gives
the same files whatever the corpus size or the number of worker processes, and a larger corpus with the same seed
starts with the files of the smaller one.

Times: frame ``i`` is shown at ``i / fps`` seconds. Every interval here is half-open on frame indices,
``[start_frame, end_frame)``; its seconds are ``start_frame / fps`` and ``end_frame / fps``. Durations and grounding
event boundaries sit on a grid of frames that are also whole hundredths of a second (``grid_frames``), so the
two-decimal times of Charades-STA annotations are exact, not rounded.

The learnable correspondence (pretraining): class ``k`` fixes the shape's colour, its form and the tone's pitch;
the shape flashes (full brightness instead of half) exactly while the tone beeps, at a seeded rhythm. The shape
always stays inside the centred square that TVLT's centre crop keeps (``centre_square``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary: colours, forms, pitches, actions
# ---------------------------------------------------------------------------------------------------------------

# Saturated colours far apart in RGB (and in hue), so a decoded 4:2:0 frame still tells them apart; the background
# is grey, so "saturated pixel" means "part of a shape".
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 200, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 200, 210),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# One pitch per colour, a fifth apart: well separated on a 128-bin mel scale and below 8 kHz (Nyquist at 16 kHz).
PITCHES_HZ: tuple[float, ...] = (330.0, 495.0, 742.5, 1113.75, 1670.625, 2505.9375)
N_CLASSES = len(COLOUR_NAMES)

DIM = 0.5  # brightness of a pretraining shape between beeps; 1.0 while it beeps
AUDIO_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)  # what the AAC encoder accepts
GOP_SECONDS = 2.0  # keyframe interval, like camera files

Kind = Literal["pretrain", "grounding", "broken"]
_KIND_STREAM = {"pretrain": 1, "grounding": 2, "broken": 3, "split": 4}


def class_of(class_id: int) -> tuple[str, str, float]:
    """(colour name, shape, pitch in Hz) of pretraining class ``class_id``."""
    return COLOUR_NAMES[class_id], SHAPES[class_id % len(SHAPES)], PITCHES_HZ[class_id]


def pitch_of(colour: str) -> float:
    return PITCHES_HZ[COLOUR_NAMES.index(colour)]


def centre_square(width: int, height: int) -> tuple[float, float, int]:
    """(left, top, side) of the centred square a pretraining shape stays in: the part of the frame the TVLT
    transform keeps (shortest edge resized, centre crop). A shape bouncing over the whole 16:9 frame was cut off or
    outside the crop in about half the sampled frames, which then carried no evidence of the clip's class."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, side


def rng_for(seed: int, kind: str, index: int) -> np.random.Generator:
    """The generator of one file (or of the split), independent of every other file."""
    return np.random.default_rng(np.random.SeedSequence([seed, _KIND_STREAM[kind], index]))


def grid_frames(fps: int) -> int:
    """Smallest number of frames that is also a whole number of hundredths of a second (24 fps: 6 = 0.25 s)."""
    return fps // math.gcd(fps, 100)


def frames_to_seconds(frames: int, fps: int) -> float:
    """Exact seconds of a frame count on the grid (two decimals, no float rounding surprises)."""
    centis, rest = divmod(frames * 100, fps)
    if rest:
        raise ValueError(f"{frames} frames at {fps} fps is not a whole hundredth of a second")
    return centis / 100


# ---------------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Media:
    """Streams of one file. ``n_frames / fps`` is the duration; audio has ``n_samples`` samples per channel."""

    width: int
    height: int
    fps: int
    n_frames: int
    audio_rate: int
    audio_channels: int
    gop_seconds: float = GOP_SECONDS

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps

    @property
    def n_samples(self) -> int:
        return round(self.n_frames * self.audio_rate / self.fps)

    @property
    def gop(self) -> int:
        """Keyframe interval in frames."""
        return max(1, round(self.gop_seconds * self.fps))


@dataclass(frozen=True)
class Profile:
    """A recipe for a file's streams; the duration is drawn from ``duration`` = (low, high) seconds."""

    width: int
    height: int
    fps: int
    duration: tuple[float, float]
    audio_rate: int
    audio_channels: int
    gop_seconds: float = GOP_SECONDS


@dataclass(frozen=True)
class Overrides:
    """Force every file to one size / fps / duration range / audio rate / keyframe interval (None keeps the
    default mix, and keyframes every ``GOP_SECONDS``)."""

    size: tuple[int, int] | None = None
    fps: int | None = None
    duration: tuple[float, float] | None = None
    audio_rate: int | None = None
    gop_seconds: float | None = None

    def __post_init__(self):
        if self.size is not None:
            w, h = self.size
            if w < 16 or h < 16:
                raise ValueError(f"size {w}x{h}: both sides must be at least 16 pixels")
            if w % 2 or h % 2:
                # libx264 with 4:2:0 chroma rejects odd sides; padding would change the size we promise.
                raise ValueError(f"size {w}x{h}: h264 4:2:0 needs even width and height, e.g. {w - w % 2}x{h - h % 2}")
        if self.fps is not None and not 1 <= self.fps <= 240:
            raise ValueError(f"fps {self.fps}: must be an integer between 1 and 240")
        if self.duration is not None:
            lo, hi = self.duration
            if not 0 < lo <= hi:
                raise ValueError(f"duration {lo}-{hi}: need 0 < low <= high seconds")
        if self.audio_rate is not None and self.audio_rate not in AUDIO_RATES:
            raise ValueError(f"audio rate {self.audio_rate}: AAC takes one of {AUDIO_RATES}")
        if self.gop_seconds is not None and not self.gop_seconds > 0:
            raise ValueError(f"keyframe interval {self.gop_seconds} s: must be > 0")

    def apply(self, p: Profile) -> Profile:
        w, h = self.size or (p.width, p.height)
        return replace(p, width=w, height=h, fps=self.fps or p.fps, duration=self.duration or p.duration,
                       audio_rate=self.audio_rate or p.audio_rate, gop_seconds=self.gop_seconds or p.gop_seconds)


@dataclass(frozen=True)
class PretrainClip:
    """Pretraining content: one shape of class ``class_id`` bouncing around, flashing while the tone beeps.

    Positions are pixels (centre of the shape), velocity pixels per frame; ``beeps`` are [start_frame, end_frame).
    """

    class_id: int
    colour: str
    shape: str
    pitch_hz: float
    radius: int
    start_xy: tuple[float, float]
    velocity_xy: tuple[float, float]
    beeps: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Event:
    """One annotated grounding event: the shape exists exactly on frames [start_frame, end_frame).

    Geometry is linear in the frame index from ``path[:2]``/``radius[0]`` at start_frame to ``path[2:]``/``radius[1]``
    at end_frame - 1; the colour switches to ``colour_after`` at the middle frame (same colour unless it "turns").
    """

    start_frame: int
    end_frame: int
    start: float
    end: float
    colour: str
    colour_after: str
    shape: str
    action: str
    sentence: str
    pitch_hz: float
    path: tuple[float, float, float, float]
    radius: tuple[float, float]


@dataclass(frozen=True)
class VideoSpec:
    """One file of the corpus: where it goes, its streams and what is drawn in them."""

    video_id: str
    kind: Kind
    path: str  # relative to the corpus folder
    media: Media
    background_seed: int
    clip: PretrainClip | None = None
    events: tuple[Event, ...] = field(default_factory=tuple)
    split: str | None = None  # grounding: "train" or "test"
    broken: str | None = None  # broken: the name of its BrokenKind

    def record(self) -> dict:
        """Ground truth for corpus.json: flat stream facts first, then the content."""
        m = self.media
        rec = {"id": self.video_id, "kind": self.kind, "path": self.path, "duration": m.duration,
               "width": m.width, "height": m.height, "fps": m.fps, "n_frames": m.n_frames, "gop": m.gop,
               "audio_rate": m.audio_rate, "audio_channels": m.audio_channels, "audio_samples": m.n_samples}
        if self.clip is not None:
            c = self.clip
            rec.update({"class": c.class_id, "colour": c.colour, "rgb": list(COLOURS[c.colour]), "shape": c.shape,
                        "pitch_hz": c.pitch_hz, "radius": c.radius, "beeps": [list(b) for b in c.beeps]})
        if self.broken is not None:
            rec["broken"] = self.broken
        if self.kind == "grounding":
            rec["split"] = self.split
            rec["events"] = [
                {"start": e.start, "end": e.end, "start_frame": e.start_frame, "end_frame": e.end_frame,
                 "sentence": e.sentence, "colour": e.colour, "colour_after": e.colour_after,
                 "rgb": list(COLOURS[e.colour]), "shape": e.shape, "action": e.action, "pitch_hz": e.pitch_hz,
                 "path": list(e.path), "radius": list(e.radius)}
                for e in self.events]
        return rec


# ---------------------------------------------------------------------------------------------------------------
# The default mix. Cycled by index, so even a handful of files covers the variety (first entries small and short);
# the large and long files come later in the cycle and stay few.
# ---------------------------------------------------------------------------------------------------------------

PRETRAIN_MIX: tuple[Profile, ...] = (
    Profile(320, 240, 30, (2.0, 5.0), 16000, 1),
    Profile(360, 640, 24, (2.0, 4.0), 44100, 2),  # portrait phone video
    Profile(322, 180, 25, (2.0, 5.0), 48000, 1),  # odd-looking (161 is odd) but even: h264 4:2:0 needs even sides
    Profile(160, 120, 60, (2.0, 4.0), 44100, 1),
    Profile(480, 270, 30, (3.0, 8.0), 48000, 2),
    Profile(256, 144, 25, (2.0, 6.0), 16000, 2),
    Profile(640, 360, 30, (4.0, 10.0), 44100, 2),
    Profile(426, 240, 24, (2.0, 6.0), 16000, 1),
    Profile(1280, 720, 30, (2.0, 3.0), 48000, 2),  # large, so short
    Profile(320, 180, 25, (30.0, 60.0), 44100, 1),  # long, so small
    Profile(270, 480, 30, (3.0, 6.0), 44100, 1),
    Profile(854, 480, 24, (3.0, 6.0), 48000, 2),
)

GROUNDING_MIX: tuple[Profile, ...] = (
    Profile(320, 240, 25, (20.0, 28.0), 16000, 1),
    Profile(480, 270, 30, (20.0, 35.0), 44100, 2),
    Profile(360, 640, 24, (25.0, 40.0), 48000, 1),
    Profile(320, 180, 60, (20.0, 30.0), 44100, 1),
    Profile(640, 360, 30, (30.0, 60.0), 44100, 2),
    Profile(426, 240, 25, (40.0, 60.0), 16000, 2),
)

ACTIONS: tuple[str, ...] = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "turns")
_PHRASES = {"moves left": "moves to the left", "moves right": "moves to the right", "moves up": "moves up",
            "moves down": "moves down", "grows": "grows bigger", "shrinks": "gets smaller"}


def sentence_for(colour: str, shape: str, action: str, colour_after: str, article: str) -> str:
    """Charades-style sentence that names what tells the event apart: colour, shape and action."""
    phrase = f"turns {colour_after}" if action == "turns" else _PHRASES[action]
    return f"{article} {colour} {shape} {phrase}."


# ---------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------


def draw_media(profile: Profile, rng: np.random.Generator) -> Media:
    """Pick a duration in the profile's range, on the frame/centisecond grid (at least one grid step)."""
    g = grid_frames(profile.fps)
    lo, hi = profile.duration
    seconds = rng.uniform(lo, hi) if hi > lo else lo
    n_frames = max(g, round(seconds * profile.fps / g) * g)
    return Media(profile.width, profile.height, profile.fps, n_frames, profile.audio_rate, profile.audio_channels,
                 profile.gop_seconds)


def _draw_beeps(n_frames: int, fps: int, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
    """Seeded rhythm: beeps of 0.15-0.3 s separated by 0.25-0.9 s of silence, each at least 2 frames long."""
    beeps, f = [], round(rng.uniform(0.1, 0.5) * fps)
    while True:
        length = max(2, round(rng.uniform(0.15, 0.3) * fps))
        if f + length > n_frames:
            break
        beeps.append((f, f + length))
        f += length + max(2, round(rng.uniform(0.25, 0.9) * fps))
    return tuple(beeps)


def plan_pretrain(seed: int, index: int, overrides: Overrides = Overrides()) -> VideoSpec:
    video_id = f"pt_{index:05d}"
    profile = overrides.apply(PRETRAIN_MIX[index % len(PRETRAIN_MIX)])
    return pretrain_spec(video_id, "pretrain", f"pretrain/{video_id}.mp4", profile, rng_for(seed, "pretrain", index))


def pretrain_spec(video_id: str, kind: Kind, path: str, profile: Profile, rng: np.random.Generator) -> VideoSpec:
    """A clip of a random class with a random trajectory and beat (also the source of the broken files)."""
    media = draw_media(profile, rng)
    class_id = int(rng.integers(N_CLASSES))
    colour, shape, pitch = class_of(class_id)
    w, h = media.width, media.height
    # Large enough to fill several 16-px patches of a 64-px tiny-preset frame, not a fraction of one.
    radius = max(4, round(rng.uniform(0.15, 0.2) * min(w, h)))
    x_lo, y_lo, side = centre_square(w, h)
    start = (rng.uniform(x_lo + radius, x_lo + side - radius), rng.uniform(y_lo + radius, y_lo + side - radius))
    # Crosses the frame in 2-6 s: moving enough to matter, slow enough to stay sharp at 24 fps.
    speed = rng.uniform(1 / 6, 1 / 2) * min(w, h) / media.fps
    angle = rng.uniform(0, 2 * math.pi)
    clip = PretrainClip(class_id, colour, shape, pitch, radius, start,
                        (speed * math.cos(angle), speed * math.sin(angle)), _draw_beeps(media.n_frames, media.fps, rng))
    return VideoSpec(video_id, kind, path, media, int(rng.integers(2**31)), clip=clip)


def _event_geometry(action: str, w: int, h: int, r: float, rng: np.random.Generator):
    """(path x0, y0, x1, y1; radius r0, r1) for an action, keeping the whole shape inside the frame."""
    margin = 1.6 * r  # room for the shape at 1.5 r
    x, y = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
    # A move covers at least 40% of its track (from the far 30% to the near 30%), several radii on any frame.
    near, far = rng.uniform(0, 0.3), rng.uniform(0.7, 1.0)
    x_near, x_far = margin + near * (w - 2 * margin), margin + far * (w - 2 * margin)
    y_near, y_far = margin + near * (h - 2 * margin), margin + far * (h - 2 * margin)
    if action == "moves left":
        return (x_far, y, x_near, y), (r, r)
    if action == "moves right":
        return (x_near, y, x_far, y), (r, r)
    if action == "moves up":
        return (x, y_far, x, y_near), (r, r)
    if action == "moves down":
        return (x, y_near, x, y_far), (r, r)
    if action == "grows":
        return (x, y, x, y), (0.5 * r, 1.5 * r)
    if action == "shrinks":
        return (x, y, x, y), (1.5 * r, 0.5 * r)
    return (x, y, x, y), (r, r)  # turns: stays put and changes colour


def plan_grounding(seed: int, index: int, overrides: Overrides = Overrides()) -> VideoSpec:
    """A video with 1-6 non-overlapping events, one per ~9 s slot, each 45-80% of its slot (several seconds at
    the default durations, so 48 frames sampled over the whole video see it) and at least one grid step away
    from the slot edges: the frames just before and after every event show no shape."""
    rng = rng_for(seed, "grounding", index)
    media = draw_media(overrides.apply(GROUNDING_MIX[index % len(GROUNDING_MIX)]), rng)
    g, fps, w, h = grid_frames(media.fps), media.fps, media.width, media.height
    slots = media.n_frames // g  # grid steps in the video
    n_events = max(1, min(6, round(media.duration / 9.0), slots // 3))
    if slots < 3:
        raise ValueError(f"grounding video of {media.duration:.2f} s at {fps} fps is too short for one event "
                         f"with empty frames around it; use durations of at least {3 * g / fps:.2f} s")
    looks = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    order = rng.permutation(len(looks))[:n_events]  # distinct colour+shape within a video
    events, r = [], 0.1 * min(w, h)
    for k in range(n_events):
        lo, hi = k * slots // n_events, (k + 1) * slots // n_events  # slot in grid steps
        length = max(1, min(hi - lo - 2, round(rng.uniform(0.45, 0.8) * (hi - lo))))
        start = int(rng.integers(lo + 1, hi - length))  # leaves >= 1 empty step on both sides
        colour, shape = looks[order[k]]
        action = ACTIONS[int(rng.integers(len(ACTIONS)))]
        colour_after = colour
        if action == "turns":
            colour_after = COLOUR_NAMES[(COLOUR_NAMES.index(colour) + int(rng.integers(1, N_CLASSES))) % N_CLASSES]
        path, radius = _event_geometry(action, w, h, r, rng)
        article = "the" if rng.random() < 0.7 else "a"
        sf, ef = start * g, (start + length) * g
        events.append(Event(sf, ef, frames_to_seconds(sf, fps), frames_to_seconds(ef, fps), colour, colour_after,
                            shape, action, sentence_for(colour, shape, action, colour_after, article),
                            pitch_of(colour), path, radius))
    video_id = f"gr_{index:05d}"
    return VideoSpec(video_id, "grounding", f"grounding/{video_id}.mp4", media, int(rng.integers(2**31)),
                     events=tuple(events))


def assign_splits(specs: list[VideoSpec], seed: int, test_fraction: float = 0.25) -> list[VideoSpec]:
    """Split grounding videos (never their sentences) into train and test: a seeded quarter goes to test,
    at least one video when there are two or more."""
    n = len(specs)
    n_test = 0 if n < 2 else max(1, round(test_fraction * n))
    test = set(rng_for(seed, "split", 0).permutation(n)[:n_test].tolist())
    return [replace(s, split="test" if i in test else "train") for i, s in enumerate(specs)]
