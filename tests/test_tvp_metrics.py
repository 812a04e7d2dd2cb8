"""Temporal IoU, R@1 and mIoU against a plain per-pair computation of interval overlap; the query-swap test by hand."""

import random

import pytest
import torch

from tvlt_core.metrics import distinct_event_pairs, grounding_metrics, query_swap, recall_at_1, temporal_iou


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
    assert metrics == pytest.approx({"r1_iou0.3": 2 / 3, "r1_iou0.5": 2 / 3, "r1_iou0.7": 1 / 3, "miou": 0.5})


# --- the query-swap test: does the prediction follow the sentence? ---------------------------------------------------
# two videos: "a" with events A = [0, 4] and B = [6, 10] (and a third query on A again), "b" with one event
VIDEOS = ["a", "a", "a", "b"]
TRUE = torch.tensor([[0.0, 4.0], [6.0, 10.0], [0.5, 4.0], [2.0, 3.0]])


def test_distinct_event_pairs_are_ordered_pairs_of_other_events_of_one_video():
    pairs = distinct_event_pairs(VIDEOS, TRUE).tolist()
    # queries 0 and 2 are one event (IoU 0.875): not a pair; video b has one event: none
    assert sorted(pairs) == [[0, 1], [1, 0], [1, 2], [2, 1]]
    assert distinct_event_pairs(["x", "y"], TRUE[:2]).shape == (0, 2), "queries of other videos never pair"


@pytest.mark.parametrize("segment", [[0.0, 4.0], [6.0, 10.0], [0.0, 10.0], [3.0, 7.0]])
def test_a_model_that_ignores_the_sentence_scores_zero(segment):
    """One prediction per video whatever the sentence: even when it sits exactly on one of the events."""
    predicted = torch.tensor([segment] * 3 + [[2.0, 3.0]])
    got = query_swap(predicted, TRUE, distinct_event_pairs(VIDEOS, TRUE))
    assert got["swap_moved"] == 0.0
    assert got["swap_lands_on_other"] == got["swap_own_on_other"]
    on_an_event = segment in ([0.0, 4.0], [6.0, 10.0])
    # on A: the pairs whose other event is A (1->0, 1->2) land, with either sentence
    assert got["swap_lands_on_other"] == (0.5 if on_an_event else 0.0)


def test_a_model_that_reads_the_sentence_moves_with_it():
    pairs = distinct_event_pairs(VIDEOS, TRUE)
    perfect = query_swap(TRUE, TRUE, pairs)
    assert perfect == {"swap_lands_on_other": 1.0, "swap_own_on_other": 0.0, "swap_moved": 1.0}
    # right for B's sentence, wrong (on B) for A's: asking for A never moves it onto A, asking for B always lands
    half = query_swap(torch.tensor([[6.0, 10.0], [6.0, 10.0], [6.0, 10.0], [2.0, 3.0]]), TRUE, pairs)
    assert half == {"swap_lands_on_other": 0.5, "swap_own_on_other": 0.5, "swap_moved": 0.0}
    # 2 of 4 pairs moved: query 2 predicts the wrong event, so pairs 1->2 (A's sentence misses A) and 2->1 (its own
    # sentence is already on B) fail; 0->1 and 1->0 move
    one_wrong = query_swap(torch.tensor([[0.0, 4.0], [6.0, 10.0], [6.0, 10.0], [2.0, 3.0]]), TRUE, pairs)
    assert one_wrong == {"swap_lands_on_other": 0.75, "swap_own_on_other": 0.25, "swap_moved": 0.5}


def test_no_video_with_two_events_gives_nan_not_a_number_that_looks_measured():
    got = query_swap(TRUE[:1], TRUE[:1], distinct_event_pairs(["a"], TRUE[:1]))
    assert all(v != v for v in got.values())
