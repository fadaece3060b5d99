"""Selection strategies: each orders the pool as its definition says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isal_backend.strategies import (
    STRATEGIES,
    CoresetStrategy,
    IsalStrategy,
    MarginStrategy,
    NotEnoughLabels,
    PoolState,
    get_strategy,
    holdout_split,
    k_center_greedy,
)
from isal_backend.strategies.isal import balanced_order, stratified_folds


def state(seed: int = 0, n_labeled: int = 120, n_pool: int = 400) -> PoolState:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 8, generator=gen) * 3
    yl = torch.arange(n_labeled) % 4
    yp = torch.randint(0, 4, (n_pool,), generator=gen)
    xl = centers[yl] + torch.randn(n_labeled, 8, generator=gen)
    xp = centers[yp] + torch.randn(n_pool, 8, generator=gen)
    return PoolState(xl, yl, xp, 4, seed=seed)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_returns_distinct_pool_indices(name: str) -> None:
    picked = get_strategy(name).select(state(), 30)
    assert picked.shape == (30,)
    assert len(set(picked.tolist())) == 30
    assert picked.min() >= 0 and picked.max() < 400


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_is_reproducible_under_a_seed(name: str) -> None:
    assert np.array_equal(get_strategy(name).select(state(3), 20), get_strategy(name).select(state(3), 20))


def test_unknown_strategy_and_oversized_budget_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="budget 401 is larger than the unlabeled pool"):
        get_strategy("random").select(state(), 401)


def test_margin_takes_the_smallest_top_two_gap_first() -> None:
    st = state()
    top2 = st.pool_probs().topk(2, dim=1).values
    gaps = (top2[:, 0] - top2[:, 1]).numpy()
    picked = MarginStrategy().select(st, 10)
    assert np.allclose(np.sort(gaps)[:10], gaps[picked])


def test_k_center_picks_the_farthest_point_each_time() -> None:
    pool = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    centers = torch.tensor([[0.0, 0.0]])
    assert k_center_greedy(pool, centers, 3).tolist() == [2, 3, 1]
    # no labels at all: still a full, distinct order (the cold-start order)
    order = CoresetStrategy().rank(PoolState(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), pool, 2), 4)
    assert sorted(order.tolist()) == [0, 1, 2, 3]


def test_holdout_is_stratified_and_deterministic() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    train, ref = holdout_split(labels, 0.2, seed=1)
    assert set(train) | set(ref) == set(range(16)) and not set(train) & set(ref)
    assert sorted(labels[ref].tolist()) == [0, 0, 1]  # the single label of class 2 stays in training
    assert np.array_equal(ref, holdout_split(labels, 0.2, seed=1)[1])
    with pytest.raises(NotEnoughLabels):
        holdout_split(torch.tensor([0, 1, 2]), 0.2, seed=0)


def test_crossfit_folds_cover_every_label_once() -> None:
    labels = torch.arange(23) % 3
    folds = stratified_folds(labels, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(23))
    for fold in folds:
        assert len(set(labels[fold].tolist())) >= 2  # classes spread across folds


def test_balanced_order_alternates_predicted_classes_best_first() -> None:
    scores = torch.tensor([-5.0, -4.0, -3.0, -2.0, -1.0, 0.0])
    predicted = torch.tensor([0, 0, 0, 1, 1, 2])
    assert balanced_order(scores, predicted, 6, seed=0).tolist() == [0, 3, 5, 1, 4, 2]


def test_isal_variants_score_with_the_documented_sign() -> None:
    """The selected batch comes from the most negative scores (before balancing)."""
    st = state()
    strategy = IsalStrategy(reference="holdout", balance="none")
    scores = strategy.scores(st)
    picked = strategy.select(st, 10)
    assert np.allclose(np.sort(scores.numpy())[:10], scores.numpy()[picked])
    assert st.report["s_test_residual"] <= 1e-8
    assert IsalStrategy(top_k=4).name == "isal"
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        IsalStrategy(top_k=4).select(state(), 5)
