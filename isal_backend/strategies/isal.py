"""ISAL selection on cached features: the authors' faithful version and the product's default.

``isal-paper``: a held-out slice of the labels is the reference set R, the head is trained on the
rest, ``s_test`` by LiSSA with the authors' settings, top-1 expected gradient, ascending order.

``isal`` (the product): the same influence, with the weaknesses measured in
``docs/isal.md`` addressed and each switchable:

* ``reference="crossfit"``: every label serves as reference once. The labels are split into
  ``folds``; for each fold a head is trained on the others and scores the pool with that fold as
  R. The per-fold scores are standardised and averaged, so R grows with the annotations without
  any head being scored against its own training data.
* ``balance="class"``: the batch is filled round-robin over the predicted classes of the full
  head (each class taking its own most negative scores), so a batch cannot collapse onto the one
  class a single direction in parameter space favours.
* ``balance="cluster"`` (alternative): the ``prefilter`` x batch most negative scores are
  clustered by k-means on their features into one cluster per batch slot and each cluster gives
  its most negative member (Zhdanov 2019's diverse mini-batch recipe), so a batch cannot pile up
  near-duplicates of one region even within a class.
* ``solver="cg"``: exact ``s_test`` (H includes the training weight decay).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from isal_backend.influence import (
    PAPER_LISSA,
    HeadInfluence,
    LinearHead,
    LissaConfig,
    check_top_k,
    fit_linear_head,
    score_head,
    solve_s_test,
)
from isal_backend.strategies.base import PoolState, Strategy, ascending


class NotEnoughLabels(ValueError):
    """ISAL needs labels both to train on and to hold out as a reference set."""


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of labeled indices into (train, reference).

    Every class with two or more labels gives at least one to the reference set and keeps one
    for training; single-label classes stay in training.
    """
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    train, ref = [], []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        take = 0 if idx.size < 2 else min(idx.size - 1, max(1, round(fraction * idx.size)))
        ref.extend(idx[:take])
        train.extend(idx[take:])
    if not ref or not train:
        raise NotEnoughLabels(
            f"ISAL needs a reference set held out from training: {labels.shape[0]} labels "
            "are too few (at least one class needs two labels)"
        )
    return np.sort(np.asarray(train)), np.sort(np.asarray(ref))


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[np.ndarray]:
    """Split labeled indices into ``folds`` groups, each class spread evenly over them."""
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    groups: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for cls in np.unique(y):
        for j, i in enumerate(rng.permutation(np.flatnonzero(y == cls))):
            groups[(offset + j) % folds].append(int(i))
        offset += int((y == cls).sum())
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups if g]


@dataclass
class InfluenceUnit:
    """One trained head with its ``s_test``: everything needed to score any feature row later.

    ``scale`` standardises the unit's scores (cross-fitted units are averaged in that scale).
    """

    head: LinearHead
    s_test: torch.Tensor
    scale: float = 1.0

    def score(self, features: torch.Tensor, top_k: int) -> torch.Tensor:
        s = self.s_test.view_as(self.head.weight)
        return score_head(self.head, s, features.to(self.head.weight.dtype), top_k) / self.scale


def score_units(units: list[InfluenceUnit], features: torch.Tensor, top_k: int) -> torch.Tensor:
    """The mean standardised score of several units (one unit: its plain ISAL score)."""
    return torch.stack([unit.score(features, top_k) for unit in units]).mean(dim=0)


def fit_unit(
    state: PoolState,
    train_idx: np.ndarray,
    ref_idx: np.ndarray,
    solver: str,
    lissa_config: LissaConfig = PAPER_LISSA,
    seed: int = 0,
    init: LinearHead | None = None,
) -> tuple[InfluenceUnit, dict[str, float]]:
    """Train a head on ``train_idx`` (warm-started from ``init``) and solve ``s_test`` for ``ref_idx``."""
    x, y = state.labeled_features.double(), state.labeled_labels
    head = fit_linear_head(x[train_idx], y[train_idx], state.num_classes, state.weight_decay, init=init)
    problem = HeadInfluence(head, x[train_idx], x[ref_idx], y[ref_idx], state.pool_features, state.weight_decay)
    s_test, report = solve_s_test(problem, solver, lissa_config, seed=seed)
    info = {"s_test_seconds": report.seconds, "s_test_iterations": float(report.iterations)}
    if report.relative_residual is not None:
        info["s_test_residual"] = report.relative_residual
    return InfluenceUnit(head, s_test), info


def balanced_order(scores: torch.Tensor, predicted: torch.Tensor, count: int, seed: int) -> np.ndarray:
    """Round-robin over predicted classes, each class in ascending score order.

    Classes take turns in the order of their best score, so the single most valuable sample is
    still first.
    """
    order = ascending(scores, scores.shape[0], seed)
    pred = predicted.cpu().numpy()[order]
    per_class = {int(c): order[pred == c] for c in np.unique(pred)}
    turn = sorted(per_class, key=lambda c: float(scores[per_class[c][0]]))
    out: list[int] = []
    depth = 0
    while len(out) < count:
        for c in turn:
            if depth < per_class[c].size:
                out.append(int(per_class[c][depth]))
                if len(out) == count:
                    break
        depth += 1
    return np.asarray(out, dtype=np.int64)


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 10) -> torch.Tensor:
    """Cluster index of every row: k-means++ seeding, then Lloyd iterations."""
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    sq = (x * x).sum(dim=1)
    centers = [int(torch.randint(x.shape[0], (1,), generator=gen))]
    nearest = (sq - 2 * x @ x[centers[0]] + sq[centers[0]]).clamp_min(0)
    for _ in range(1, k):
        total = float(nearest.sum())
        pick = int(torch.multinomial(nearest / total, 1, generator=gen)) if total > 0 else int(nearest.argmax())
        centers.append(pick)
        nearest = torch.minimum(nearest, (sq - 2 * x @ x[pick] + sq[pick]).clamp_min(0))
    c = x[centers].clone()
    assign = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iters):
        assign = (sq[:, None] - 2 * x @ c.T + (c * c).sum(dim=1)[None, :]).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return assign


def cluster_order(scores: torch.Tensor, features: torch.Tensor, count: int, prefilter: int, seed: int) -> np.ndarray:
    """The most negative member of each of ``count`` k-means clusters of the ``prefilter * count`` best.

    Best first; clusters left empty are filled with the next best candidates.
    """
    candidates = ascending(scores, min(scores.shape[0], prefilter * count), seed)
    if candidates.size <= count:
        return candidates[:count]
    assign = kmeans(features[candidates], count, seed).numpy()
    first: dict[int, int] = {}
    for position, cluster in enumerate(assign):  # candidates are in ascending order: first seen = best
        first.setdefault(int(cluster), position)
    chosen = sorted(first.values())
    taken = set(chosen)
    chosen += [p for p in range(candidates.size) if p not in taken][: count - len(chosen)]
    return candidates[np.sort(np.asarray(chosen[:count]))]


@dataclass
class IsalStrategy(Strategy):
    """ISAL over the linear head. Defaults are the product's; :func:`paper_isal` gives the authors'."""

    reference: str = "crossfit"  # "crossfit" | "holdout"
    balance: str = "class"  # "class" | "cluster" | "none"
    solver: str = "cg"  # "cg" | "cholesky" | "auto" | "lissa"
    top_k: int = 1
    folds: int = 5
    holdout_fraction: float = 0.2
    lissa_config: LissaConfig = PAPER_LISSA
    #: balance="cluster": candidates per batch slot that go into k-means.
    prefilter: int = 10
    name: str = "isal"

    def __post_init__(self) -> None:
        if self.reference not in ("crossfit", "holdout"):
            raise ValueError(f"reference must be 'crossfit' or 'holdout', got {self.reference!r}")
        if self.balance not in ("class", "cluster", "none"):
            raise ValueError(f"balance must be 'class', 'cluster' or 'none', got {self.balance!r}")
        if self.prefilter < 1:
            raise ValueError(f"prefilter must be at least 1, got {self.prefilter}")
        if self.folds < 2:
            raise ValueError(f"crossfit needs at least 2 folds, got {self.folds}")

    def fit(self, state: PoolState) -> list[InfluenceUnit]:
        """The trained heads and their ``s_test``: one held-out unit, or one per cross-fitting fold."""
        check_top_k(self.top_k, state.num_classes)
        y = state.labeled_labels
        if self.reference == "holdout":
            train, ref = holdout_split(y, self.holdout_fraction, state.seed)
            unit, info = fit_unit(state, train, ref, self.solver, self.lissa_config, state.seed)
            state.report.update(info)
            return [unit]
        folds = stratified_folds(y, self.folds, state.seed)
        if len(folds) < 2:
            raise NotEnoughLabels(f"cross-fitting needs at least 2 labels, got {y.shape[0]}")
        everything = np.arange(y.shape[0])
        units, seconds = [], 0.0
        for j, ref in enumerate(folds):
            unit, info = fit_unit(state, np.setdiff1d(everything, ref), ref, self.solver, self.lissa_config,
                                  state.seed + j)
            pool_scores = unit.score(state.pool_features, self.top_k)
            std = float(pool_scores.std()) if pool_scores.numel() > 1 else 0.0
            unit.scale = std if std > 0 else 1.0
            units.append(unit)
            seconds += info["s_test_seconds"]
        state.report["s_test_seconds"] = seconds
        return units

    def scores(self, state: PoolState) -> torch.Tensor:
        """Pool scores; lower is more valuable."""
        return score_units(self.fit(state), state.pool_features, self.top_k)

    def rank(self, state: PoolState, count: int) -> np.ndarray:
        scores = self.scores(state)
        if self.balance == "class":
            predicted = state.pool_probs().argmax(dim=1)
            return balanced_order(scores, predicted, count, state.seed)
        if self.balance == "cluster":
            return cluster_order(scores, state.pool_features, count, self.prefilter, state.seed)
        return ascending(scores, count, state.seed)


def paper_isal() -> IsalStrategy:
    """The authors' settings: held-out R, LiSSA "paper" preset, top-1, no balancing."""
    return IsalStrategy(reference="holdout", balance="none", solver="lissa", name="isal-paper")
