"""ISAL as a strategy: order by influence, optionally balanced over predicted classes.

The influence itself (reference set, ``s_test``, expected gradient) is computed by the task kind in
the round's s_test step, as :class:`IsalOptions` ask; this module only decides what is asked and how
the scores become an order. ``isal`` is the product's default; ``isal-paper`` the authors' settings
(a held-out reference set, LiSSA with their preset, top-1 expected gradient, no balancing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from isal_backend.influence import PAPER, SolverConfig
from isal_backend.strategies import ISAL, ISAL_PAPER
from isal_backend.strategies.base import PoolView, SignalMissing, Strategy, ascending, balanced_order

REFERENCES = ("crossfit", "holdout")
BALANCES = ("class", "none")


@dataclass(frozen=True)
class IsalOptions:
    """What a task kind's s_test step builds, and how the order uses the scores."""

    #: ``crossfit``: every label is in the reference set once, for a model that did not train on it;
    #: ``holdout``: one held-out reference set (a stable one where models warm-start, as detectors do).
    reference: str = "crossfit"
    folds: int = 5
    holdout_fraction: float = 0.2
    #: Classes in the expected gradient (classification); None: 2, or 1 with two classes.
    top_k: int | None = None
    #: ``class``: batches filled round-robin over predicted classes; ``none``: plain ascending scores.
    balance: str = "class"
    solver: SolverConfig = field(default_factory=SolverConfig)
    #: > 0: influence orders only the ``shortlist x count`` smallest-margin items (uncertainty proposes,
    #: influence disposes); 0: the whole pool.
    shortlist: float = 0.0
    #: > 0: an item whose embedding has a cosine similarity above this to one already in the batch waits
    #: until the batch is full (near-duplicates teach one thing once).
    dedupe: float = 0.0
    #: Items that look like the tasks annotators skipped go after the others (a skip costs a label).
    skip_aware: bool = False

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {self.balance!r}")
        if self.folds < 2:
            raise ValueError(f"crossfit needs at least 2 folds, got {self.folds}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.shortlist < 0 or not 0.0 <= self.dedupe < 1.0:
            raise ValueError(f"shortlist must be >= 0 and dedupe in [0, 1): {self.shortlist}, {self.dedupe}")

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"reference": self.reference, "balance": self.balance, "top_k": self.top_k or "auto",
                                  "solver": self.solver.describe()}
        if self.reference == "crossfit":
            out["folds"] = self.folds
        else:
            out["holdout_fraction"] = self.holdout_fraction
        out.update({"shortlist": self.shortlist, "dedupe": self.dedupe, "skip_aware": self.skip_aware})
        return out


#: The authors' settings: a held-out reference set, LiSSA "paper" preset, top-1, no balancing.
PAPER_OPTIONS = IsalOptions(reference="holdout", top_k=1, balance="none", solver=PAPER)


class IsalStrategy(Strategy):
    """Most negative influence first (the task kind computed it under :attr:`options`)."""

    def __init__(self, options: IsalOptions | None = None, name: str = ISAL) -> None:
        self.options = options or IsalOptions()
        self.name = name  # "isal" and "isal-paper" are two settings of one strategy

    def keys(self, view: PoolView) -> torch.Tensor:
        return view.influence()

    def order(self, view: PoolView, count: int, seed: int) -> np.ndarray:
        """Influence order (class-balanced), over a margin shortlist, skip-like items last, near-copies deferred."""
        scores = view.influence()
        n = scores.shape[0]
        candidates = np.arange(n)
        options = self.options
        if options.shortlist > 0:
            try:
                top2 = view.probabilities().topk(2, dim=1).values
                candidates = np.sort(ascending(top2[:, 0] - top2[:, 1], max(count, round(options.shortlist * count)),
                                               seed))
            except SignalMissing:  # a detector has no class posterior: influence orders the whole pool
                pass
        groups = view.groups() if options.balance == "class" else None
        first = self._ranked(scores, groups, candidates, seed)
        rest = self._ranked(scores, groups, np.setdiff1d(np.arange(n), candidates), seed)
        order = np.concatenate([first, rest])
        if options.skip_aware:
            skip = view.skip_likeness()
            if skip is not None:  # stable: each part keeps its influence order
                likely = skip.numpy()[order] >= 0.5
                order = np.concatenate([order[~likely], order[likely]])
        if options.dedupe > 0:
            order = deferred_duplicates(order, view.embeddings()[0], options.dedupe, count)
        return order[:count]

    @staticmethod
    def _ranked(scores: torch.Tensor, groups: torch.Tensor | None, subset: np.ndarray, seed: int) -> np.ndarray:
        if subset.size == 0:
            return subset
        index = torch.as_tensor(subset)
        if groups is not None:
            local = balanced_order(scores[index], groups[index], subset.size, seed)
        else:
            local = ascending(scores[index], subset.size, seed)
        return subset[local]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **self.options.describe()}


def deferred_duplicates(order: np.ndarray, embeddings: torch.Tensor, threshold: float, count: int) -> np.ndarray:
    """``order`` with every item too similar (cosine > ``threshold``) to an earlier pick moved behind the first
    ``count`` picks; only as many items as the batch needs are compared."""
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    picked: list[int] = []
    deferred: list[int] = []
    position = 0
    while len(picked) < count and position < order.size:
        item = int(order[position])
        position += 1
        if picked and float((x[picked] @ x[item]).max()) > threshold:
            deferred.append(item)
        else:
            picked.append(item)
    return np.concatenate([np.asarray(picked + deferred, dtype=np.int64), order[position:]])


def paper_isal() -> IsalStrategy:
    return IsalStrategy(PAPER_OPTIONS, name=ISAL_PAPER)
