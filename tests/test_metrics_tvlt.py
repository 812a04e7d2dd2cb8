"""TVLT metrics (matching accuracy, ROC-AUC, retrieval ranks and R@k, chance R@k) against hand-computed cases and
against plain pairwise definitions.

    .venv/bin/python -m pytest tests/test_metrics_tvlt.py -q      # about a second
"""

import itertools

import pytest
import torch

from tvlt_core.metrics import chance_recall_at_k, matching_accuracy, recall_at_k, roc_auc, target_ranks


def pairwise_auc(scores: list[float], labels: list[int]) -> float:
    """The definition: P(a positive scores above a negative), ties one half, over every (positive, negative) pair."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_matching_accuracy_by_hand():
    # 2 > 0 with label 1 and -1 <= 0 with label 0 are right; 0 is not > 0 (label 1: wrong); 3 with label 0: wrong
    assert matching_accuracy(torch.tensor([2.0, -1.0, 0.0, 3.0]), torch.tensor([1, 0, 1, 0])) == 0.5
    assert matching_accuracy(torch.tensor([[5.0], [-5.0]]), torch.tensor([[1.0], [0.0]])) == 1.0
    with pytest.raises(ValueError):
        matching_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([1]))


def test_roc_auc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3 of 4 pairs
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # ties count one half: 0.5 (positive) ties both negatives (1), 0.9 beats both (2) -> 3 of 4
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5, 0.9]), torch.tensor([1, 0, 0, 1])) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 0, 0])) == 1.0
    assert roc_auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1, 1])) == 0.0
    assert roc_auc(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 1, 1])) == 0.5  # a constant scorer is chance
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.tensor([0.2, 0.3]), torch.tensor([1, 1]))


def test_roc_auc_equals_the_pairwise_definition_with_many_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 7, (300,), generator=g).double() / 2  # 7 distinct values: ties everywhere
    labels = (torch.rand(300, generator=g) < 0.3).long()
    assert roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_target_ranks_and_recall_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.1], [0.3, 0.8, 0.4]])
    # query 0: its 0.9 is the top -> rank 0; query 1: 0.2 tied with candidate 0, the tie ranks ahead -> rank 1;
    # query 2: 0.4 below candidate 1's 0.8 -> rank 1
    ranks = target_ranks(scores, torch.tensor([0, 1, 2]))
    assert ranks.tolist() == [0, 1, 1]
    assert recall_at_k(ranks, ks=(1, 2, 3)) == {1: pytest.approx(1 / 3), 2: 1.0, 3: 1.0}
    # a scorer giving every candidate the same score gets no credit at R@1
    assert recall_at_k(target_ranks(torch.zeros(4, 4), torch.arange(4)), ks=(1,)) == {1: 0.0}
    with pytest.raises(ValueError):
        target_ranks(scores, torch.tensor([0, 1]))


def test_chance_recall_by_hand():
    # four queries among 4 candidates and two among 2: R@1 = (4 * 1/4 + 2 * 1/2) / 6, R@3 = (4 * 3/4 + 2 * 1) / 6
    chance = chance_recall_at_k([4, 4, 4, 4, 2, 2], ks=(1, 3, 5))
    assert chance == {1: pytest.approx(1 / 3), 3: pytest.approx(5 / 6), 5: 1.0}
    with pytest.raises(ValueError):
        chance_recall_at_k([], ks=(1,))


def test_chance_recall_is_what_random_scores_get():
    """Random scores over galleries of 10: the measured R@k lands on the chance formula (5 sigma: 0.01)."""
    g = torch.Generator().manual_seed(1)
    queries, gallery = 20000, 10
    scores = torch.rand(queries, gallery, generator=g, dtype=torch.float64)
    targets = torch.randint(0, gallery, (queries,), generator=g)
    measured = recall_at_k(target_ranks(scores, targets), ks=(1, 5, 10))
    chance = chance_recall_at_k([gallery] * queries, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert measured[k] == pytest.approx(chance[k], abs=0.01)
