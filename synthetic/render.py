"""Pixels and samples of a synthetic file, drawn from its spec (numpy only, no randomness beyond the spec's seeds).

Shapes:
    frames  (H * 3 / 2, W) uint8 planar yuv420p (Y rows, then U and V at half resolution), one per video frame
    audio   (C, N) float32 in [-1, 1], C = media.audio_channels, N = media.n_samples

Frames are drawn straight in yuv420p, the encoder's input, because an RGB -> YUV conversion per frame cost as much
as the encoding itself. Colours convert with BT.601 limited range, the matrix decoders assume for untagged video
(and that swscale uses), so decoded RGB comes back as ``spec.COLOURS`` within h264's rounding.

Backgrounds are grey (zero saturation, so U = V = 128) with low-contrast clutter and a static noise texture; shapes
are saturated. The noise is static on purpose: per-frame noise would dominate the h264 bitrate and the generation
time while adding nothing a model needs to learn through.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from synthetic.spec import COLOURS, DIM, Media, VideoSpec, centre_square

TONE_AMPLITUDE = 0.4  # pretraining beeps
EVENT_AMPLITUDE = 0.25  # grounding event tones
NOISE_STD = 0.01  # audio hiss, about 30 dB below the beeps
RAMP_SECONDS = 0.005  # raised-cosine fade in/out so tones do not click


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def rgb_to_yuv(rgb) -> np.ndarray:
    """(3,) uint8 Y, U, V of an RGB triple: BT.601, limited range (Y 16-235, chroma 16-240)."""
    r, g, b = (float(c) for c in rgb)
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    return np.clip(np.round([y, u, v]), 0, 255).astype(np.uint8)


def background_grey(media: Media, seed: int) -> np.ndarray:
    """(H, W) uint8 grey levels: a vertical gradient, 3-6 flat grey rectangles and a static noise texture."""
    rng = np.random.default_rng(seed)
    h, w = media.height, media.width
    base = rng.uniform(70, 130)
    img = base + np.linspace(-15, 15, h, dtype=np.float32)[:, None] * rng.choice([-1, 1])
    img = np.broadcast_to(img, (h, w)).copy()
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        x1, y1 = x0 + int(rng.integers(4, max(5, w // 3))), y0 + int(rng.integers(4, max(5, h // 3)))
        img[y0:y1, x0:x1] = base + rng.uniform(-25, 25)
    img += rng.normal(0, 4, size=(h, w)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_mask(shape: str, radius: float) -> np.ndarray:
    """(2R+1, 2R+1) bool mask of a shape centred in its box, R = ceil(radius)."""
    rr = max(1, int(np.ceil(radius)))
    y, x = np.ogrid[-rr:rr + 1, -rr:rr + 1]
    if shape == "circle":
        return x * x + y * y <= radius * radius
    if shape == "square":
        return (np.abs(x) <= 0.85 * radius) & (np.abs(y) <= 0.85 * radius)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= radius
    if shape == "triangle":  # apex up, base at y = radius / 2
        return (y <= 0.5 * radius) & (np.abs(x) <= (y + radius) * (0.866 / 1.5))
    raise ValueError(f"unknown shape {shape!r}")


def _paint_plane(plane: np.ndarray, mask: np.ndarray, x0: int, y0: int, value: int) -> tuple[slice, slice]:
    """Set ``plane`` to ``value`` where ``mask`` (top-left at x0, y0) is True, clipped; returns the touched box."""
    h, w = plane.shape
    fx0, fy0 = max(0, x0), max(0, y0)
    fx1, fy1 = min(w, x0 + mask.shape[1]), min(h, y0 + mask.shape[0])
    box = (slice(fy0, max(fy0, fy1)), slice(fx0, max(fx0, fx1)))
    if fx1 > fx0 and fy1 > fy0:
        plane[box][mask[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]] = value
    return box


def _bounce(p0: float, v: float, lo: float, hi: float, t: np.ndarray) -> np.ndarray:
    """Position at frames ``t`` of a point moving at ``v`` per frame and reflecting off [lo, hi]."""
    span = hi - lo
    u = np.mod(p0 - lo + v * t, 2 * span)
    return lo + np.where(u > span, 2 * span - u, u)


def in_intervals(n: int, intervals) -> np.ndarray:
    """(n,) bool: frame (or sample) index inside any of the half-open ``intervals``."""
    inside = np.zeros(n, dtype=bool)
    for a, b in intervals:
        inside[a:b] = True
    return inside


def _tone(out: np.ndarray, rate: int, a: int, b: int, pitch: float, amplitude: float) -> None:
    """Add a sine from sample ``a`` to ``b`` (phase from sample 0, so beeps of one pitch stay coherent)."""
    b = min(b, out.shape[0])
    if b <= a:
        return
    t = np.arange(a, b, dtype=np.float64) / rate
    env = np.full(b - a, amplitude)
    ramp = min(round(RAMP_SECONDS * rate), (b - a) // 2)
    if ramp:
        fade = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp))
        env[:ramp] *= fade
        env[b - a - ramp:] *= fade[::-1]
    out[a:b] += (env * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


def _noise(media: Media, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1])
    return (NOISE_STD * rng.standard_normal(media.n_samples)).astype(np.float32)


def _channels(mono: np.ndarray, media: Media) -> np.ndarray:
    """(C, N): the same signal on every channel (stereo files differ in layout, not in content)."""
    return np.ascontiguousarray(np.repeat(mono[None], media.audio_channels, axis=0))


def _samples(frame: int, media: Media) -> int:
    return round(frame * media.audio_rate / media.fps)


class Canvas:
    """A yuv420p frame buffer over a fixed background; paint shapes, hand the buffer out, erase them again."""

    def __init__(self, media: Media, seed: int):
        h, w = media.height, media.width
        grey = background_grey(media, seed).astype(np.float32)
        self.background = np.full((h * 3 // 2, w), 128, dtype=np.uint8)  # chroma of grey is 128
        self.background[:h] = np.round(16 + grey * (219 / 255)).astype(np.uint8)
        self.frame = self.background.copy()
        self._planes = self._split(self.frame, h, w)
        self._bg_planes = self._split(self.background, h, w)
        self._boxes: list[tuple[int, tuple[slice, slice]]] = []

    @staticmethod
    def _split(buf: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chroma = buf[h:].reshape(2, h // 2, w // 2)  # U plane then V plane, contiguous after Y
        return buf[:h], chroma[0], chroma[1]

    def paint(self, mask: np.ndarray, cx: float, cy: float, rgb) -> None:
        """Paint ``rgb`` through ``mask`` centred at pixel (cx, cy). A chroma sample takes the colour when at
        least two of its four luma pixels are inside, so edges look like a 4:2:0 camera's."""
        rr = mask.shape[0] // 2
        x0, y0 = round(cx) - rr, round(cy) - rr
        ex, ey = x0 % 2, y0 % 2  # align the mask to the chroma grid
        m = np.pad(mask, ((ey, (ey + mask.shape[0]) % 2), (ex, (ex + mask.shape[1]) % 2)))
        cmask = m.reshape(m.shape[0] // 2, 2, m.shape[1] // 2, 2).sum(axis=(1, 3)) >= 2
        x0, y0 = x0 - ex, y0 - ey
        yuv = rgb_to_yuv(rgb)
        self._boxes.append((0, _paint_plane(self._planes[0], m, x0, y0, yuv[0])))
        for p in (1, 2):
            self._boxes.append((p, _paint_plane(self._planes[p], cmask, x0 // 2, y0 // 2, yuv[p])))

    def erase(self) -> None:
        """Restore the background wherever something was painted since the last erase."""
        for p, box in self._boxes:
            self._planes[p][box] = self._bg_planes[p][box]
        self._boxes.clear()


# ---------------------------------------------------------------------------------------------------------------
# Pretraining clips
# ---------------------------------------------------------------------------------------------------------------


def pretrain_frames(spec: VideoSpec) -> Iterator[np.ndarray]:
    """Yield yuv420p frames: the class's shape bouncing, bright during beeps, half-bright otherwise.

    The same buffer is yielded every time (the shape is erased after the consumer has taken its copy).
    """
    m, c = spec.media, spec.clip
    canvas = Canvas(m, spec.background_seed)
    mask = shape_mask(c.shape, c.radius)
    t = np.arange(m.n_frames)
    x_lo, y_lo, side = centre_square(m.width, m.height)  # what the TVLT centre crop keeps
    xs = _bounce(c.start_xy[0], c.velocity_xy[0], x_lo + c.radius, x_lo + side - c.radius, t)
    ys = _bounce(c.start_xy[1], c.velocity_xy[1], y_lo + c.radius, y_lo + side - c.radius, t)
    flashing = in_intervals(m.n_frames, c.beeps)
    bright = np.array(COLOURS[c.colour], dtype=np.float32)
    dim = np.round(DIM * bright)
    for i in range(m.n_frames):
        canvas.paint(mask, xs[i], ys[i], bright if flashing[i] else dim)
        yield canvas.frame
        canvas.erase()


def pretrain_audio(spec: VideoSpec) -> np.ndarray:
    """(C, N) float32: the class's pitch during each beep (sample-exact with the flashing frames) over quiet hiss."""
    m, c = spec.media, spec.clip
    mono = _noise(m, spec.background_seed)
    for a, b in c.beeps:
        _tone(mono, m.audio_rate, _samples(a, m), _samples(b, m), c.pitch_hz, TONE_AMPLITUDE)
    return _channels(mono, m)


# ---------------------------------------------------------------------------------------------------------------
# Grounding videos
# ---------------------------------------------------------------------------------------------------------------


def grounding_frames(spec: VideoSpec) -> Iterator[np.ndarray]:
    """Yield yuv420p frames: the background, plus the one shape of the event active at that frame.

    The same buffer is yielded every time (see ``pretrain_frames``).
    """
    m = spec.media
    canvas = Canvas(m, spec.background_seed)
    active = np.full(m.n_frames, -1)
    for k, e in enumerate(spec.events):
        active[e.start_frame:e.end_frame] = k
    for i in range(m.n_frames):
        k = active[i]
        if k >= 0:
            e = spec.events[k]
            p = (i - e.start_frame) / max(1, e.end_frame - 1 - e.start_frame)  # 0 at the first frame, 1 at the last
            x0, y0, x1, y1 = e.path
            colour = e.colour if i < (e.start_frame + e.end_frame) // 2 else e.colour_after
            mask = shape_mask(e.shape, e.radius[0] + p * (e.radius[1] - e.radius[0]))
            canvas.paint(mask, x0 + p * (x1 - x0), y0 + p * (y1 - y0), COLOURS[colour])
        yield canvas.frame
        canvas.erase()


def grounding_audio(spec: VideoSpec) -> np.ndarray:
    """(C, N) float32: each event sounds its colour's pitch while it lasts, over quiet hiss."""
    m = spec.media
    mono = _noise(m, spec.background_seed)
    for e in spec.events:
        _tone(mono, m.audio_rate, _samples(e.start_frame, m), _samples(e.end_frame, m), e.pitch_hz, EVENT_AMPLITUDE)
    return _channels(mono, m)


def render(spec: VideoSpec) -> tuple[Iterator[np.ndarray], np.ndarray]:
    """(frames iterator, audio) of a pretraining or grounding spec."""
    if spec.kind == "pretrain":
        return pretrain_frames(spec), pretrain_audio(spec)
    if spec.kind == "grounding":
        return grounding_frames(spec), grounding_audio(spec)
    raise ValueError(f"{spec.video_id}: nothing to render for kind {spec.kind!r}")
