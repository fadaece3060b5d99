"""Selection strategies: each orders the pool as its definition says, through a task kind's real view of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from isal_backend.influence import TopKError
from isal_backend.labelstudio.config import ClassificationConfig, DetectionConfig
from isal_backend.settings import Settings
from isal_backend.strategies import ALL_STRATEGIES, MEAN_CONFIDENCE, STRATEGIES
from isal_backend.strategies.base import balanced_order
from isal_backend.strategies.baselines import CoresetStrategy, MarginStrategy, k_center_greedy
from isal_backend.strategies.catalog import make_strategy
from isal_backend.strategies.isal import IsalOptions
from isal_backend.tasks import TaskParts
from isal_backend.tasks.base import NotEnoughLabels
from isal_backend.tasks.classification import (
    ClassificationInputs,
    ClassificationTask,
    holdout_split,
    stratified_folds,
)
from isal_backend.tasks.detection import DetectionTask

CONFIG = ClassificationConfig("image", "image", "label", ["a", "b", "c", "d"])


def task(tmp_path: Path, **settings: object) -> ClassificationTask:
    s = Settings(model_dir=tmp_path, feature_dim=0, **settings)  # type: ignore[arg-type]
    return ClassificationTask(CONFIG, TaskParts(s, 1, tmp_path / "projects" / "1"))


def inputs(seed: int = 0, n_labeled: int = 120, n_pool: int = 400) -> ClassificationInputs:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 8, generator=gen) * 3
    yl = torch.arange(n_labeled) % 4
    yp = torch.randint(0, 4, (n_pool,), generator=gen)
    xl = centers[yl] + torch.randn(n_labeled, 8, generator=gen)
    xp = centers[yp] + torch.randn(n_pool, 8, generator=gen)
    return ClassificationInputs.of(list(range(n_labeled)), list(range(1000, 1000 + n_pool)), xl, yl, xp)


def ordered(tmp_path: Path, name: str, seed: int, count: int) -> np.ndarray:
    t = task(tmp_path)
    data = inputs(seed)
    model, _ = t.fit(data, None, seed)
    strategy, _ = t.strategy(name)
    if hasattr(strategy, "options"):
        model, _ = t.influence(model, data, strategy.options, seed)
    return strategy.order(t.view(model, data), count, seed)


@pytest.mark.parametrize("name", sorted(ALL_STRATEGIES))
def test_every_strategy_returns_distinct_pool_positions(tmp_path: Path, name: str) -> None:
    picked = ordered(tmp_path, name, 0, 30)
    assert picked.shape == (30,) and len(set(picked.tolist())) == 30
    assert picked.min() >= 0 and picked.max() < 400


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_is_reproducible_under_a_seed(tmp_path: Path, name: str) -> None:
    assert np.array_equal(ordered(tmp_path, name, 3, 20), ordered(tmp_path, name, 3, 20))


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        make_strategy("nope")


def test_margin_takes_the_smallest_top_two_gap_first(tmp_path: Path) -> None:
    t, data = task(tmp_path), inputs()
    model, _ = t.fit(data, None, 0)
    view = t.view(model, data)
    top2 = view.probabilities().topk(2, dim=1).values
    gaps = (top2[:, 0] - top2[:, 1]).numpy()
    picked = MarginStrategy().order(view, 10, 0)
    assert np.allclose(np.sort(gaps)[:10], gaps[picked])


def test_k_center_picks_the_farthest_point_each_time(tmp_path: Path) -> None:
    pool = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    centers = torch.tensor([[0.0, 0.0]])
    assert k_center_greedy(pool, centers, 3).tolist() == [2, 3, 1]
    # no labels at all: still a full, distinct order (the cold-start order), from the task's own view
    empty = ClassificationInputs.of([], [1, 2, 3, 4], torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), pool)
    order = CoresetStrategy().order(task(tmp_path).view(None, empty), 4, 0)
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


def test_isal_scores_with_the_documented_sign_and_an_exact_s_test(tmp_path: Path) -> None:
    """The selected batch comes from the most negative scores (before balancing)."""
    t, data = task(tmp_path), inputs()
    model, _ = t.fit(data, None, 0)
    options = IsalOptions(reference="holdout", balance="none")
    model, info = t.influence(model, data, options, 0)
    view = t.view(model, data)
    scores = view.influence().numpy()
    picked = make_strategy("isal", options).order(view, 10, 0)
    assert np.allclose(np.sort(scores)[:10], scores[picked])
    assert info["s_test_residual"] <= 1e-8 and info["influence_units"] == 1
    with pytest.raises(TopKError, match="smaller than the number of classes"):
        t.influence(model, data, IsalOptions(top_k=4), 0)


def test_crossfit_makes_one_unit_per_fold_and_validates_out_of_fold(tmp_path: Path) -> None:
    t, data = task(tmp_path), inputs()
    model, info = t.fit(data, None, 0)
    assert len(model.fold_heads) == 5 and 0.5 < info["validation_accuracy"] <= 1.0
    model, info = t.influence(model, data, t.isal_options(paper=False), 0)
    assert info["influence_units"] == 5 and info["reference_size"] == 120  # every label is in R once


def test_detection_turns_uncertainty_measures_into_mean_confidence(tmp_path: Path) -> None:
    parts = TaskParts(Settings(model_dir=tmp_path), 1, tmp_path)
    detection = DetectionTask(DetectionConfig("image", "image", "label", ["cell"]), parts)
    for name in ("margin", "entropy", "least-confidence"):
        strategy, note = detection.strategy(name)
        assert strategy.name == MEAN_CONFIDENCE and name in (note or "")
    isal, note = detection.strategy("isal")
    assert note is None and isal.describe()["reference"] == "holdout"  # a warm-started detector is never cross-fitted
    assert all(detection.strategy(name)[0] for name in STRATEGIES)


def test_typical_first_takes_one_dense_image_per_cluster_largest_clusters_first(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    sizes = [60, 30, 10]
    pool = torch.cat([centers[i] + torch.randn(n, 2, generator=gen) for i, n in enumerate(sizes)])
    outlier = torch.tensor([[60.0, 60.0]])
    pool = torch.cat([pool, outlier])
    data = ClassificationInputs.of([], list(range(pool.shape[0])), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long),
                                   pool)
    view = task(tmp_path).view(None, data)
    order = make_strategy("typical").order(view, 3, seed=0)
    cluster_of = [int(torch.cdist(pool[i : i + 1], centers).argmin()) for i in order]
    assert cluster_of == [0, 1, 2] and 100 not in order.tolist()  # core-set would take the outlier first
    assert CoresetStrategy().order(view, 2, seed=0).tolist()[1] == 100  # the farthest point: the outlier


def test_isal_shortlist_dedupe_and_skip_awareness(tmp_path: Path) -> None:
    t, data = task(tmp_path), inputs()
    model, _ = t.fit(data, None, 0)
    plain = IsalOptions(reference="holdout", balance="none")
    model, _ = t.influence(model, data, plain, 0)
    view = t.view(model, data)
    top2 = view.probabilities().topk(2, dim=1).values
    margins = (top2[:, 0] - top2[:, 1]).numpy()
    shortlisting = make_strategy("isal", IsalOptions(reference="holdout", balance="none", shortlist=2))
    shortlisted = shortlisting.order(view, 10, 0)
    assert set(shortlisted.tolist()) <= set(np.argsort(margins)[:20].tolist())  # only the 20 smallest margins
    scores = view.influence().numpy()[np.argsort(margins)[:20]]
    assert np.allclose(np.sort(scores)[:10], view.influence().numpy()[shortlisted])  # ordered by influence there
    # a near-copy of the first pick waits until the batch is full
    first = int(make_strategy("isal", plain).order(view, 1, 0)[0])
    copy = data.pool_features[first] + 1e-4
    both = ClassificationInputs.of(data.labeled_ids, [*data.pool_ids, 99_999], data.labeled_features,
                                   data.labeled_labels, torch.cat([data.pool_features, copy[None]]))
    model2, _ = t.influence(t.fit(both, None, 0)[0], both, plain, 0)
    view2 = t.view(model2, both)
    deduped = make_strategy("isal", IsalOptions(reference="holdout", balance="none", dedupe=0.999))
    pair = {first, 400}
    assert pair <= set(make_strategy("isal", plain).order(view2, 5, 0).tolist())  # both rank high ...
    assert len(pair & set(deduped.order(view2, 5, 0).tolist())) == 1  # ... but one batch takes one of them
    # skip awareness: with skipped images like one part of the pool, that part goes last
    skipped = data.pool_features[:10] + 0.01
    skipping = ClassificationInputs.of(data.labeled_ids, data.pool_ids, data.labeled_features, data.labeled_labels,
                                       data.pool_features)
    rows = torch.cat([skipping.rows.features, skipped])
    keys = [*skipping.labeled_keys, *skipping.pool_keys, *(f"skip-{i}" for i in range(10))]
    skipping.rows = type(skipping.rows)(keys, rows)
    skipping.cancelled_keys = [f"skip-{i}" for i in range(10)]
    aware = make_strategy("isal", IsalOptions(reference="holdout", balance="none", skip_aware=True))
    view3 = t.view(model, skipping)
    likeness = view3.skip_likeness()
    assert likeness is not None and float(likeness[:10].mean()) > 0.5 > float(likeness[10:].mean())
    flagged = (likeness >= 0.5).numpy()[aware.order(view3, 400, 0)]
    assert flagged.any() and not flagged[: int((~flagged).sum())].any()  # every skip-like one after the others
