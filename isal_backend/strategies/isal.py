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
from isal_backend.strategies.base import PoolView, Strategy, ascending, balanced_order

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

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {self.balance!r}")
        if self.folds < 2:
            raise ValueError(f"crossfit needs at least 2 folds, got {self.folds}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"reference": self.reference, "balance": self.balance, "top_k": self.top_k or "auto",
                                  "solver": self.solver.describe()}
        if self.reference == "crossfit":
            out["folds"] = self.folds
        else:
            out["holdout_fraction"] = self.holdout_fraction
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
        scores = view.influence()
        if self.options.balance == "class":
            return balanced_order(scores, view.groups(), count, seed)
        return ascending(scores, count, seed)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **self.options.describe()}


def paper_isal() -> IsalStrategy:
    return IsalStrategy(PAPER_OPTIONS, name=ISAL_PAPER)
