"""Evaluation metrics, vectorised: temporal grounding (TVP) and video-audio matching and retrieval (TVLT).

Grounding: temporal IoU, R@1 at IoU thresholds, mIoU; and the query-swap test, which asks whether the prediction
follows the sentence at all (``query_swap``).

Segments are (start, end) pairs in any one unit (seconds or fractions of the duration), shape (N, 2).
With one prediction per query (TVP predicts exactly one segment), R@1 at IoU m is the fraction of queries whose
prediction has IoU >= m with the ground truth; mIoU is the mean IoU.

A prediction with end < start has IoU 0: its intersection ``min(ends) - max(starts)`` is negative, like that of
two disjoint segments. Ground-truth segments must have end >= start.

Matching and retrieval (TVLT): accuracy of matching logits at 0, ROC-AUC of matching scores, and audio-to-video
recall at k over score matrices, each with the value a scorer without information would get (chance).
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


def recall_key(threshold: float) -> str:
    """The one name of R@1 at an IoU threshold, in every dict, MLflow key and tag: ``r1_iou0.5``."""
    return f"r1_iou{threshold:g}"


# Grounding metrics by name, with what a table prints for each.
GROUNDING_LABELS = {**{recall_key(m): f"R@1 IoU={m:g}" for m in IOU_THRESHOLDS}, "miou": "mIoU"}


def grounding_metrics(
    pred: torch.Tensor, target: torch.Tensor, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[str, float]:
    """``{"r1_iou0.3": ..., "r1_iou0.5": ..., "r1_iou0.7": ..., "miou": ...}`` for (N, 2) segments, in [0, 1]."""
    iou = temporal_iou(pred, target)
    recalls = recall_at_1(iou, thresholds)
    metrics = {recall_key(m): float(r) for m, r in zip(thresholds, recalls)}
    metrics["miou"] = float(iou.mean())
    return metrics


# --- does the prediction follow the sentence (TVP) -----------------------------------------------------------------
SWAP_IOU = 0.5  # "lands on an event": IoU >= this with its true segment; two events are distinct below it
SWAP_KEYS = ("swap_lands_on_other", "swap_own_on_other", "swap_moved")


def distinct_event_pairs(videos: Sequence[str], true: torch.Tensor, threshold: float = SWAP_IOU) -> torch.Tensor:
    """(P, 2) index pairs ``(i, j)``, every ordered pair of queries of one video (``videos[i] == videos[j]``) whose
    true segments are different events (IoU < ``threshold`` with each other). A video with one event has none."""
    by_video: dict[str, list[int]] = {}
    for index, video in enumerate(videos):
        by_video.setdefault(video, []).append(index)
    pairs = [(i, j) for members in by_video.values() for i in members for j in members if i != j]
    if not pairs:
        return torch.empty(0, 2, dtype=torch.long)
    pairs_t = torch.tensor(pairs, dtype=torch.long)
    true = torch.as_tensor(true, dtype=torch.float64)
    distinct = temporal_iou(true[pairs_t[:, 0]], true[pairs_t[:, 1]]) < threshold
    return pairs_t[distinct]


def query_swap(
    predicted: torch.Tensor, true: torch.Tensor, pairs: torch.Tensor, threshold: float = SWAP_IOU
) -> dict[str, float]:
    """What asking a video for its other event does, over ``pairs`` (``distinct_event_pairs``) of (Q, 2) segments.

    For a pair (i, j), query j is the video asked with the other event's sentence in place of query i's, so
    ``predicted[j]`` is that answer (the frames are the same; evaluation is deterministic). Per pair:

        swap_lands_on_other   the other event's sentence puts the prediction on the other event (j on j)
        swap_own_on_other     query i's own sentence already put it there (i on j): what a model that does not
                              read the sentence would show as often as the line above
        swap_moved            both: j lands on j and i does not. A model that ignores the sentence predicts one
                              segment for both queries, so it scores exactly 0 here, whatever it predicts

    Each is the share of pairs; NaN when there are none (no video with two distinct events).
    """
    if pairs.shape[0] == 0:
        return dict.fromkeys(SWAP_KEYS, float("nan"))
    predicted, true = torch.as_tensor(predicted, dtype=torch.float64), torch.as_tensor(true, dtype=torch.float64)
    own, other = pairs[:, 0], pairs[:, 1]
    lands = temporal_iou(predicted[other], true[other]) >= threshold
    stays = temporal_iou(predicted[own], true[other]) >= threshold
    shares = (lands.double().mean(), stays.double().mean(), (lands & ~stays).double().mean())
    return {key: float(v) for key, v in zip(SWAP_KEYS, shares)}


# --- matching and retrieval (TVLT) ----------------------------------------------------------------------------------
RECALL_KS = (1, 5, 10)


def matching_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of (N,) matching logits on the right side of 0 for (N,) labels in {0, 1} (1 = the pair matches)."""
    logits, labels = torch.as_tensor(logits).reshape(-1), torch.as_tensor(labels).reshape(-1)
    if logits.shape != labels.shape or logits.numel() == 0:
        raise ValueError(f"expected as many logits as labels, at least one, got {logits.numel()} and {labels.numel()}")
    return float(((logits > 0) == (labels > 0.5)).double().mean())


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of (N,) scores for (N,) labels in {0, 1}: the probability that a random positive
    scores above a random negative, ties counting one half (the Mann-Whitney U statistic, from average ranks).
    0.5 is chance; raises ValueError without at least one positive and one negative."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    positive = torch.as_tensor(labels).reshape(-1) > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if scores.shape != positive.shape or n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs one label per score and both classes, got {n_pos} positive, {n_neg} negative")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value: tied scores share the mean of the ranks they span
    first = torch.cumsum(counts, 0) - counts + 1
    ranks = (first + (counts - 1) / 2.0)[inverse]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, G) scores of Q queries against G candidates and (Q,) index of each query's true candidate -> (Q,) 0-based
    rank of the true candidate. Ties count against it: a candidate scoring exactly the same ranks ahead, so a
    scorer that gives every candidate the same score never gets credit."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if scores.dim() != 2 or targets.shape[0] != scores.shape[0]:
        raise ValueError(f"expected (Q, G) scores and (Q,) targets, got {tuple(scores.shape)} and {tuple(targets.shape)}")
    true = scores.gather(1, targets[:, None])
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, targets[:, None], False)
    return ((scores >= true) & others).sum(dim=1)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """(Q,) 0-based ranks of the true candidates -> {k: share of queries ranked within the top k}."""
    ranks = torch.as_tensor(ranks).reshape(-1)
    if ranks.numel() == 0:
        raise ValueError("recall_at_k needs at least one query")
    return {k: float((ranks < k).double().mean()) for k in ks}


def chance_recall_at_k(gallery_sizes: Sequence[int], ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """Expected R@k of a random ranking: a query among G candidates has min(k, G) / G, averaged over the queries
    (``gallery_sizes`` holds each query's G)."""
    sizes = torch.as_tensor(list(gallery_sizes), dtype=torch.float64)
    if sizes.numel() == 0 or bool((sizes < 1).any()):
        raise ValueError("chance_recall_at_k needs at least one query, each with a gallery of at least 1")
    return {k: float((sizes.clamp(max=k) / sizes).mean()) for k in ks}
