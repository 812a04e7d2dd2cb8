"""The one frame resizer (PIL bilinear) of preprocessing, training and evaluation, with numpy and PIL only.

    resize_center_crop    TVLT: shortest edge to S (long edge int(S * long / short)), centre crop S x S
    tvp_resize_pad        TVP (loading): longest edge to S (short edge int(S * short / long)), zero-pad to S x S
    resize_longest_edge   TVP (shards): longest edge to S, not padded (the loader pads)
    FrameResize           one of the shard recipes as a small value the decoder child receives with each request

Torch-free so the sandboxed decoder child (``pipelines.sandbox``) can resize frames where they are decoded: only
frames at shard size cross its pipe. ``tvlt_core.video`` re-exports the resizers beside its torch transforms.
All take uint8 (T, H, W, 3) RGB (or one (H, W, 3) frame; anything ``np.asarray`` accepts, CPU tensors included).
Decoder-side scalers give different pixels (about 4.5/255 on average), so frames resized anywhere else would not
match what the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image


def _frames(frames, name: str) -> tuple[np.ndarray, bool]:
    """(uint8 (T, H, W, 3) array, whether the input was one frame)."""
    array = np.asarray(frames)
    if array.dtype != np.uint8:
        raise TypeError(f"{name} expects uint8 frames, got {array.dtype}")
    single = array.ndim == 3
    if single:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {array.shape}")
    return array, single


def _bilinear(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.BILINEAR))


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) with the short edge at ``size``; the long edge is truncated like the reference."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def longest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) with the long edge at ``size``; the short edge is truncated like the reference."""
    if height >= width:
        return size, int(size * (width * 1.0 / height))
    return int(size * (height * 1.0 / width)), size


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre crop an (H, W, C) array with H, W >= size to (size, size, C); odd margins leave the extra row/column
    at the bottom/right, as the reference does."""
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top : top + size, left : left + size]


def resize_center_crop(frames, size: int) -> np.ndarray:
    """Shortest edge to ``size``, centre crop ``size`` x ``size``: uint8 (T, size, size, 3), C-contiguous (or one
    (size, size, 3) frame for one frame in)."""
    array, single = _frames(frames, "resize_center_crop")
    new_h, new_w = shortest_edge_size(array.shape[1], array.shape[2], size)
    out = np.empty((array.shape[0], size, size, 3), dtype=np.uint8)
    for i, frame in enumerate(array):
        out[i] = _center_crop(_bilinear(frame, new_h, new_w), size)
    return out[0] if single else out


def tvp_resize_pad(frames, size: int) -> np.ndarray:
    """Longest edge to ``size``, zero-padded, centred, to ``size`` x ``size`` (top/left margin = ceil(half the
    margin), as the reference's centre crop pads): uint8 (T, size, size, 3) (or one frame)."""
    array, single = _frames(frames, "tvp_resize_pad")
    new_h, new_w = longest_edge_size(array.shape[1], array.shape[2], size)
    top, left = -(-(size - new_h) // 2), -(-(size - new_w) // 2)  # ceil, as the reference's centre crop
    out = np.zeros((array.shape[0], size, size, 3), dtype=np.uint8)
    for i, frame in enumerate(array):
        out[i, top : top + new_h, left : left + new_w] = _bilinear(frame, new_h, new_w)
    return out[0] if single else out


def resize_longest_edge(frames, size: int) -> np.ndarray:
    """Longest edge to ``size``, not padded: uint8 (T, h, w, 3), sides truncated like ``TvpImageProcessor``."""
    array, single = _frames(frames, "resize_longest_edge")
    new_h, new_w = longest_edge_size(array.shape[1], array.shape[2], size)
    out = np.stack([_bilinear(frame, new_h, new_w) for frame in array])
    return out[0] if single else out


@dataclass(frozen=True)
class FrameResize:
    """How a shard recipe sizes its frames: TVLT's centre crop or TVP's longest edge, at ``size`` pixels."""

    kind: Literal["center_crop", "longest_edge"]
    size: int

    def __call__(self, frames) -> np.ndarray:
        if self.kind == "center_crop":
            return resize_center_crop(frames, self.size)
        return resize_longest_edge(frames, self.size)
