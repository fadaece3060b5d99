"""The selection interface: a strategy orders a pool through the :class:`PoolView` its task kind provides.

Strategies know nothing of images, heads or detectors. Each task kind (classification, detection, ...)
turns its fitted model and the pool into a :class:`PoolView`: diversity embeddings, a posterior when it
has one, a confidence, groups to balance batches over, influence scores. So one strategy is written
once and orders every kind; a kind that lacks a signal (a detector has no class posterior) says so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

import numpy as np
import torch


class SignalMissing(ValueError):
    """The task kind cannot give what the strategy needs (e.g. class posteriors from a detector)."""


class PoolView(Protocol):
    """What a task kind's fitted model (or, at cold start, its features alone) says about the unlabeled pool."""

    @property
    def size(self) -> int:
        """Number of unlabeled items."""
        ...

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pool, labeled)`` rows in one feature space, for diversity orders."""
        ...

    def probabilities(self) -> torch.Tensor:
        """Pool posteriors over the classes (n x C); raises :class:`SignalMissing` when the kind has none."""
        ...

    def confidence(self) -> torch.Tensor:
        """Per pool item, how sure the model is (higher is surer)."""
        ...

    def groups(self) -> torch.Tensor:
        """Per pool item, the group batches are balanced over (a predicted class); -1 for none."""
        ...

    def influence(self) -> torch.Tensor:
        """Per pool item, the ISAL score (lower is more valuable); needs the round's s_test step."""
        ...

    def skip_likeness(self) -> torch.Tensor | None:
        """Per pool item, how much it looks like the tasks annotators skipped (0..1); None without such evidence."""
        ...


class Strategy(ABC):
    """Orders the unlabeled pool, most valuable first."""

    name: str = "strategy"
    #: Whether the strategy looks at a trained model (random and core-set do not).
    needs_model: ClassVar[bool] = True

    def keys(self, view: PoolView) -> torch.Tensor | None:
        """Per-item value the order ascends (new tasks are placed by it); None when the order is set-wise."""
        return None

    @abstractmethod
    def order(self, view: PoolView, count: int, seed: int) -> np.ndarray:
        """The ``count`` most valuable pool positions, best first."""

    def describe(self) -> dict[str, object]:
        """The strategy and its options, JSON-ready (recipes and reports)."""
        return {"name": self.name}


def ascending(values: torch.Tensor | np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Indices of the ``count`` smallest values, ties broken by a seeded random order."""
    values = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    tiebreak = np.random.default_rng(seed).random(values.shape[0])
    order = np.lexsort((tiebreak, values))
    return order[:count]


def balanced_order(scores: torch.Tensor, groups: torch.Tensor, count: int, seed: int) -> np.ndarray:
    """Round-robin over groups (predicted classes), each group in ascending score order.

    Groups take turns in the order of their best score, so the single most valuable item is still
    first; a batch cannot collapse onto the one class a single direction in parameter space favours.
    """
    order = ascending(scores, scores.shape[0], seed)
    pred = groups.cpu().numpy()[order]
    per_group = {int(c): order[pred == c] for c in np.unique(pred)}
    turn = sorted(per_group, key=lambda c: float(scores[per_group[c][0]]))
    out: list[int] = []
    depth = 0
    count = min(count, scores.shape[0])
    while len(out) < count:
        for c in turn:
            if depth < per_group[c].size:
                out.append(int(per_group[c][depth]))
                if len(out) == count:
                    break
        depth += 1
    return np.asarray(out, dtype=np.int64)
