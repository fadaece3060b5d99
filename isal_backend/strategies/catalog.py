"""A strategy by name, for a task kind: the one place names become strategy objects."""

from __future__ import annotations

from isal_backend.strategies import (
    ALL_STRATEGIES,
    CORESET,
    ENTROPY,
    ISAL,
    ISAL_PAPER,
    LEAST_CONFIDENCE,
    MARGIN,
    MEAN_CONFIDENCE,
    RANDOM,
    TYPICAL,
)
from isal_backend.strategies.base import Strategy
from isal_backend.strategies.baselines import (
    CoresetStrategy,
    EntropyStrategy,
    LeastConfidenceStrategy,
    MarginStrategy,
    MeanConfidenceStrategy,
    RandomStrategy,
    TypicalStrategy,
)
from isal_backend.strategies.isal import IsalOptions, IsalStrategy

_PLAIN: dict[str, type[Strategy]] = {
    RANDOM: RandomStrategy, ENTROPY: EntropyStrategy, MARGIN: MarginStrategy,
    LEAST_CONFIDENCE: LeastConfidenceStrategy, MEAN_CONFIDENCE: MeanConfidenceStrategy, CORESET: CoresetStrategy,
    TYPICAL: TypicalStrategy,
}


def check_name(name: str) -> str:
    """``name`` if it is a strategy, else a ValueError listing them."""
    if name not in ALL_STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: choose from {', '.join(ALL_STRATEGIES)}")
    return name


def make_strategy(name: str, isal: IsalOptions | None = None) -> Strategy:
    """The strategy called ``name``; ISAL's two names take the task kind's :class:`IsalOptions`."""
    check_name(name)
    if name in (ISAL, ISAL_PAPER):
        return IsalStrategy(isal, name=name)
    return _PLAIN[name]()
