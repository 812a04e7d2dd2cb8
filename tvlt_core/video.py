"""Frame transforms, one section per model.

TVLT (what ``TvltImageProcessor`` does, split in two so shards can hold ready-sized JPEG frames):

    frames uint8 (T, H, W, 3), any size
      -> resize_center_crop: shortest edge to 224 with PIL bilinear (long edge int(224 * long / short)),
         centre crop 224 x 224                                   -> uint8 (T, 224, 224, 3)   [preprocessing]
      -> normalize: x / 255, then (x - 0.5) / 0.5                 -> float32 (T, 3, 224, 224) in [-1, 1]   [loading]
      -> pad_videos: stack clips of up to ``num_frames`` frames   -> pixel_values (B, T, 3, 224, 224), pixel_mask

``pixel_mask`` (B, T * (224 // 16) ** 2) is 1 for patches of real frames, 0 for padded frames, frame-major.
One resizer (PIL bilinear, ``tvlt_core.resize``, torch-free so the decoder child runs it too) serves preprocessing,
training and evaluation: decoder-side scalers give different pixels (about 4.5/255 on average), so frames resized
elsewhere would not match what the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tvlt_core import resize
from tvlt_core.input_spec import TVLT_IMAGE_SIZE, TVP_IMAGE_SIZE

# ----------------------------------------------------------------------------------------------------- TVLT

TVLT_PATCH_SIZE = 16


def resize_center_crop(frames: np.ndarray | torch.Tensor, size: int = TVLT_IMAGE_SIZE) -> np.ndarray:
    """Resize every frame's shortest edge to ``size`` (PIL bilinear) and centre crop to ``size`` x ``size``.

    Args:
        frames: uint8 (T, H, W, 3) RGB, or one frame (H, W, 3).
    Returns:
        uint8 (T, size, size, 3) (or (size, size, 3) for one frame), C-contiguous.
    """
    return resize.resize_center_crop(frames, size)


def normalize(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) RGB -> float32 (T, 3, H, W) in [-1, 1] ((x / 255 - 0.5) / 0.5, mean = std = 0.5)."""
    tensor = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 frames, got {tensor.dtype}")
    if tensor.dim() != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {tuple(tensor.shape)}")
    return tensor.permute(0, 3, 1, 2).to(torch.float32).div(255.0).sub(0.5).div(0.5).contiguous()


def pixel_mask(
    frame_counts: Sequence[int],
    *,
    num_frames: int | None = None,
    image_size: int = TVLT_IMAGE_SIZE,
    patch_size: int = TVLT_PATCH_SIZE,
) -> torch.Tensor:
    """Patch mask for a batch of clips with ``frame_counts[i]`` real frames each.

    Returns:
        (B, num_frames * (image_size // patch_size) ** 2) float32, 1 on patches of real frames; ``num_frames``
        defaults to the largest count (as the reference image processor does).
    """
    patches_per_frame = (image_size // patch_size) ** 2
    total = max(frame_counts) if num_frames is None else num_frames
    if max(frame_counts) > total:
        raise ValueError(f"a clip has {max(frame_counts)} frames, more than num_frames={total}")
    mask = torch.zeros(len(frame_counts), total * patches_per_frame, dtype=torch.float32)
    for i, count in enumerate(frame_counts):
        mask[i, : count * patches_per_frame] = 1.0
    return mask


def pad_videos(
    videos: Sequence[torch.Tensor],
    *,
    num_frames: int | None = None,
    patch_size: int = TVLT_PATCH_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack normalised clips (T_i, 3, S, S) into ``pixel_values`` (B, T, 3, S, S) and ``pixel_mask``.

    Missing frames are zeros; the model ignores them through ``pixel_mask`` (and the MAE loss skips them).
    ``num_frames`` defaults to the longest clip.
    """
    if len(videos) == 0:
        raise ValueError("pad_videos needs at least one clip")
    shape = tuple(videos[0].shape[1:])
    if len(shape) != 3 or any(tuple(v.shape[1:]) != shape for v in videos):
        raise ValueError(f"clips must share (3, S, S) frames, got {[tuple(v.shape) for v in videos]}")
    counts = [v.shape[0] for v in videos]
    total = max(counts) if num_frames is None else num_frames
    mask = pixel_mask(counts, num_frames=total, image_size=shape[-1], patch_size=patch_size)
    pixel_values = torch.zeros(len(videos), total, *shape, dtype=torch.float32)
    for i, v in enumerate(videos):
        pixel_values[i, : v.shape[0]] = v
    return pixel_values, mask


# ----------------------------------------------------------------------------------------------------- TVP
# What ``TvpImageProcessor`` does with its defaults (``Intel/tvp-base``), split so shards can hold ready-sized
# uint8 frames without their padding:
#
#     frames uint8 (T, H, W, 3) RGB, any size
#       -> resize_longest_edge: longest edge to S with PIL bilinear (short edge int(S * short / long))
#                                                                        -> uint8 (T, h, w, 3)    [preprocessing]
#       -> tvp_resize_pad: the same resize (a no-op on stored frames), then zero-pad to S x S with the image centred
#          (top/left margin = ceil(half the margin): the reference's centre crop pads an image smaller than its
#          crop)                                                         -> uint8 (T, S, S, 3)    [loading]
#       -> tvp_normalize: x / 255, (x - 0.5) / 0.5, RGB -> BGR           -> float32 (T, 3, S, S)  [loading]
#
# Padding with 0 before normalising is what makes the border -1, as in the reference; the flip to BGR is what
# the pretrained checkpoints expect. ``tvp_logits_to_seconds`` turns the model's (start, end) fractions back
# into seconds.


def tvp_resize_pad(frames: np.ndarray | torch.Tensor, size: int = TVP_IMAGE_SIZE) -> np.ndarray:
    """Resize every frame's longest edge to ``size`` (PIL bilinear) and zero-pad it, centred, to ``size`` x ``size``.

    Args:
        frames: uint8 (T, H, W, 3) RGB, or one frame (H, W, 3).
    Returns:
        uint8 (T, size, size, 3) (or (size, size, 3) for one frame).
    """
    return resize.tvp_resize_pad(frames, size)


def tvp_normalize(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, S, S, 3) RGB -> float32 (T, 3, S, S) BGR in [-1, 1] ((x / 255 - 0.5) / 0.5)."""
    return normalize(frames).flip(1).contiguous()


def tvp_preprocess(frames: np.ndarray | torch.Tensor, size: int = TVP_IMAGE_SIZE) -> torch.Tensor:
    """Frames straight to one clip's model input: uint8 (T, H, W, 3) RGB -> float32 (T, 3, size, size) BGR.

    Stack clips of ``num_frames`` frames into ``pixel_values`` (B, T, 3, size, size) for ``TvpForVideoGrounding``.
    """
    return tvp_normalize(tvp_resize_pad(frames, size))


def tvp_logits_to_seconds(logits: torch.Tensor, durations: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
    """(B, 2) predicted (start, end) fractions and (B,) video durations in seconds -> (B, 2) (start, end) seconds.

    The reference's ``post_process_video_grounding`` does this for the first sample only and rounds to 0.1 s;
    here every sample is converted and nothing is rounded (metrics want the exact values).
    """
    durations = torch.as_tensor(durations, dtype=torch.float32, device=logits.device).reshape(-1, 1)
    if logits.dim() != 2 or logits.shape[-1] != 2 or durations.shape[0] not in (1, logits.shape[0]):
        raise ValueError(f"expected logits (B, 2) and B durations, got {tuple(logits.shape)} and {durations.shape[0]}")
    return logits.float() * durations
