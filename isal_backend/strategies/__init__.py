"""Selection strategies behind one interface; :func:`get_strategy` builds one by name."""

from __future__ import annotations

from collections.abc import Callable

from isal_backend.strategies.base import PoolState, Strategy, ascending
from isal_backend.strategies.baselines import (
    CoresetStrategy,
    EntropyStrategy,
    LeastConfidenceStrategy,
    MarginStrategy,
    RandomStrategy,
    k_center_greedy,
)
from isal_backend.strategies.isal import IsalStrategy, NotEnoughLabels, holdout_split, paper_isal

STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "isal": IsalStrategy,
    "isal-paper": paper_isal,
    "random": RandomStrategy,
    "entropy": EntropyStrategy,
    "margin": MarginStrategy,
    "least-confidence": LeastConfidenceStrategy,
    "coreset": CoresetStrategy,
}


def get_strategy(name: str) -> Strategy:
    """A strategy by name; an unknown name lists the known ones."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}") from None


__all__ = [
    "STRATEGIES",
    "CoresetStrategy",
    "EntropyStrategy",
    "IsalStrategy",
    "LeastConfidenceStrategy",
    "MarginStrategy",
    "NotEnoughLabels",
    "PoolState",
    "RandomStrategy",
    "Strategy",
    "ascending",
    "get_strategy",
    "holdout_split",
    "k_center_greedy",
    "paper_isal",
]
