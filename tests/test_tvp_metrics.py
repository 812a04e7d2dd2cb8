"""Temporal IoU, R@1 and mIoU: vectorised results against a plain per-pair computation of interval overlap."""

import random

import pytest
import torch

from tvlt_core.metrics import grounding_metrics, recall_at_1, temporal_iou


def interval_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Set-based IoU of two closed intervals (0 for an empty interval)."""
    if a[1] < a[0] or b[1] < b[0]:
        return 0.0
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def test_iou_matches_interval_arithmetic_on_random_segments():
    rng = random.Random(0)
    pairs = []
    for _ in range(500):
        gt = sorted(rng.uniform(0, 30) for _ in range(2))
        pred = [rng.uniform(0, 30), rng.uniform(0, 30)]  # unsorted on purpose: some predictions are inverted
        pairs.append((pred, gt))
    pred = torch.tensor([p for p, _ in pairs])
    gt = torch.tensor([g for _, g in pairs])
    got = temporal_iou(pred, gt)
    want = torch.tensor([interval_iou(p, g) for p, g in pairs], dtype=torch.float64)
    assert got.shape == (500,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got[pred[:, 1] < pred[:, 0]] == 0).all()


def test_edge_cases():
    pred = torch.tensor([[1.0, 3.0], [0.0, 1.0], [2.0, 2.0], [5.0, 6.0]])
    gt = torch.tensor([[1.0, 3.0], [1.0, 2.0], [2.0, 2.0], [0.0, 10.0]])
    torch.testing.assert_close(temporal_iou(pred, gt), torch.tensor([1.0, 0.0, 0.0, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="start, end"):
        temporal_iou(pred, gt[:2])


def test_recall_and_miou():
    iou = torch.tensor([0.1, 0.3, 0.5, 0.69, 0.7, 0.95], dtype=torch.float64)  # thresholds are inclusive
    torch.testing.assert_close(recall_at_1(iou), torch.tensor([5 / 6, 4 / 6, 2 / 6], dtype=torch.float64))
    pred = torch.tensor([[0.0, 10.0], [0.0, 5.0], [8.0, 9.0]])
    gt = torch.tensor([[0.0, 10.0], [0.0, 10.0], [0.0, 1.0]])
    metrics = grounding_metrics(pred, gt)
    assert metrics == pytest.approx({"R@1,IoU=0.3": 2 / 3, "R@1,IoU=0.5": 2 / 3, "R@1,IoU=0.7": 1 / 3, "mIoU": 0.5})
