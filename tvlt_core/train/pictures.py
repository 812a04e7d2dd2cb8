"""The pictures training logs with ``log_image`` at a step (the run page shows them on a step slider): what TVLT
makes of a clip (``reconstructions``) and where TVP puts each query's segment (``segments``)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from tvlt_core.models.tvlt import TvltConfig, patchify_audio, patchify_pixels


def unpatchify_pixels(patches: torch.Tensor, frames: int, size: int, patch: int) -> torch.Tensor:
    """Inverse of ``patchify_pixels``: (B, T * (S/P)^2, P * P * C) -> (B, T, C, S, S)."""
    b, g = patches.shape[0], size // patch
    x = patches.reshape(b, frames, g, g, patch, patch, -1)
    return torch.einsum("nthwpqc->ntchpwq", x).reshape(b, frames, -1, size, size)


def unpatchify_audio(patches: torch.Tensor, time: int, patch: list[int], freq: int = 128) -> torch.Tensor:
    """Inverse of ``patchify_audio``: (B, A/p0 * F/p1, p0 * p1) -> (B, 1, A, F)."""
    b = patches.shape[0]
    x = patches.reshape(b, time // patch[0], freq // patch[1], patch[0], patch[1], 1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 1, time, freq)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """Values in [-1, 1] -> uint8 [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def reconstructions(c: TvltConfig, batch: dict, output) -> dict[str, np.ndarray]:
    """The batch's first clip beside what the model makes of it: ``frames`` (rows: original | masked |
    reconstructed, frames left to right) and ``spectrogram`` (the same three rows, low pitch at the bottom)."""
    pixels = batch["pixel_values"][:1].float()  # (1, T, C, S, S)
    target = patchify_pixels(pixels, c.image_patch_size[0])
    removed = output.pixel_label_masks[:1].detach().float().cpu()[..., None]  # (1, Np, 1), 1 = removed
    predicted = output.pixel_logits[:1].detach().float().cpu()
    shown = [target, target * (1 - removed), target * (1 - removed) + predicted * removed]  # removed: grey
    t, size = pixels.shape[1], pixels.shape[-1]
    rows = [unpatchify_pixels(x, t, size, c.image_patch_size[0])[0] for x in shown]  # 3 x (T, C, S, S)
    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # (C, 3S, T*S)
    out = {"frames": _to_uint8(grid).transpose(1, 2, 0)}

    spectrogram = batch["audio_values"][:1].float()  # (1, 1, A, 128)
    target = patchify_audio(spectrogram, c.audio_patch_size)
    removed = output.audio_label_masks[:1].detach().float().cpu()[..., None]
    predicted = output.audio_logits[:1].detach().float().cpu()
    shown = [target, target * (1 - removed), target * (1 - removed) + predicted * removed]
    time = spectrogram.shape[2]
    rows = [unpatchify_audio(x, time, c.audio_patch_size)[0, 0].T.flip(0) for x in shown]  # low pitch at the bottom
    out["spectrogram"] = _to_uint8(torch.cat(rows, dim=0))  # (3 * 128, A)
    return out


def segments(rows: list[dict]) -> np.ndarray:
    """Per query (``{"duration", "true", "predicted"}`` in seconds) two lanes over the video's duration: the true
    segment in green above the predicted one in blue. (H, 400, 3) uint8."""
    width, lane = 400, 14
    picture = Image.new("RGB", (width, lane * 3 * len(rows) + 4), "white")
    draw = ImageDraw.Draw(picture)
    for i, r in enumerate(rows):
        y = i * lane * 3 + 2
        for j, (seg, colour) in enumerate(((r["true"], "green"), (r["predicted"], "blue"))):
            a, b = (int(width * v / r["duration"]) for v in seg)
            draw.rectangle([0, y + j * lane, width - 1, y + j * lane + lane - 3], outline="lightgrey")
            draw.rectangle([min(a, b), y + j * lane, max(a, b), y + j * lane + lane - 3], fill=colour)
    return np.asarray(picture)
