"""Temporal grounding metrics, vectorised over a batch: temporal IoU, R@1 at IoU thresholds, mIoU.

Segments are (start, end) pairs in any one unit (seconds or fractions of the duration), shape (N, 2).
With one prediction per query (TVP predicts exactly one segment), R@1 at IoU m is the fraction of queries whose
prediction has IoU >= m with the ground truth; mIoU is the mean IoU.

A prediction with end < start has IoU 0: its intersection ``min(ends) - max(starts)`` is negative, like that of
two disjoint segments. Ground-truth segments must have end >= start.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IOU_THRESHOLDS = (0.3, 0.5, 0.7)


def temporal_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows: (N, 2), (N, 2) -> (N,) in [0, 1].

    The union is the hull ``max(ends) - min(starts)``, equal to the true union whenever the segments overlap (and
    IoU is 0 otherwise); TVP's loss uses the same form. Two identical zero-length segments give 0.
    """
    pred, target = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(target, dtype=torch.float64)
    if pred.shape != target.shape or pred.dim() != 2 or pred.shape[-1] != 2:
        raise ValueError(
            f"expected two (N, 2) tensors of (start, end), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    inter = (torch.minimum(pred[:, 1], target[:, 1]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    hull = torch.maximum(pred[:, 1], target[:, 1]) - torch.minimum(pred[:, 0], target[:, 0])
    return torch.where(hull > 0, inter / hull.clamp(min=torch.finfo(hull.dtype).tiny), torch.zeros_like(hull))


def recall_at_1(iou: torch.Tensor, thresholds: Sequence[float] = IOU_THRESHOLDS) -> torch.Tensor:
    """(N,) IoUs -> (len(thresholds),) fraction of queries with IoU >= each threshold."""
    iou = torch.as_tensor(iou, dtype=torch.float64)
    if iou.numel() == 0:
        raise ValueError("recall_at_1 needs at least one query")
    limits = torch.as_tensor(thresholds, dtype=torch.float64)
    return (iou[:, None] >= limits[None, :]).double().mean(dim=0)


def grounding_metrics(
    pred: torch.Tensor, target: torch.Tensor, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[str, float]:
    """``{"R@1,IoU=0.3": ..., "R@1,IoU=0.5": ..., "R@1,IoU=0.7": ..., "mIoU": ...}`` for (N, 2) segments, in [0, 1]."""
    iou = temporal_iou(pred, target)
    recalls = recall_at_1(iou, thresholds)
    metrics = {f"R@1,IoU={m:g}": float(r) for m, r in zip(thresholds, recalls)}
    metrics["mIoU"] = float(iou.mean())
    return metrics
