"""The selection interface every strategy implements, ISAL and baselines alike.

A strategy sees a :class:`PoolState` (cached features of the labeled set and of the unlabeled
pool) and returns pool indices in priority order. Working on features keeps every strategy cheap
enough to run on every annotation; strategies that need the model train their own head with the
same recipe (:func:`isal_backend.influence.fit_linear_head`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from isal_backend.influence import LinearHead, fit_linear_head


@dataclass
class PoolState:
    """What a strategy may look at: labeled features with labels, pool features."""

    labeled_features: torch.Tensor
    labeled_labels: torch.Tensor
    pool_features: torch.Tensor
    num_classes: int
    weight_decay: float = 1e-3
    seed: int = 0
    #: Head trained on ALL labeled samples; fitted on first use when not given.
    head: LinearHead | None = None
    #: Filled by strategies: whatever they measured (timings, solver residuals, ...).
    report: dict[str, float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labeled_features.shape[0] != self.labeled_labels.shape[0]:
            raise ValueError("labeled_features and labeled_labels differ in length")
        if self.pool_features.ndim != 2:
            raise ValueError(f"pool_features must be n x d, got {tuple(self.pool_features.shape)}")

    @property
    def pool_size(self) -> int:
        return self.pool_features.shape[0]

    def full_head(self) -> LinearHead:
        if self.head is None:
            self.head = fit_linear_head(
                self.labeled_features, self.labeled_labels, self.num_classes, self.weight_decay
            )
        return self.head

    def pool_probs(self) -> torch.Tensor:
        return self.full_head().probs(self.pool_features.to(self.full_head().weight.dtype))


class Strategy(ABC):
    """Orders the unlabeled pool, most valuable first."""

    name: str = "strategy"
    #: Whether the strategy needs a trained head (and so at least one label).
    needs_labels: bool = True

    @abstractmethod
    def rank(self, state: PoolState, count: int) -> np.ndarray:
        """The ``count`` most valuable pool indices, best first."""

    def select(self, state: PoolState, budget: int) -> np.ndarray:
        if budget > state.pool_size:
            raise ValueError(f"budget {budget} is larger than the unlabeled pool ({state.pool_size})")
        return self.rank(state, budget)


def ascending(values: torch.Tensor | np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Indices of the ``count`` smallest values, ties broken by a seeded random order."""
    values = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    tiebreak = np.random.default_rng(seed).random(values.shape[0])
    order = np.lexsort((tiebreak, values))
    return order[:count]
