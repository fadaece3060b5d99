"""Selection strategies: their names (here, torch-free, so settings can validate them) and their code.

The code is in the submodules: :mod:`.base` (the :class:`~.base.PoolView` every task kind provides and the
:class:`~.base.Strategy` interface), :mod:`.baselines`, :mod:`.isal`, and :mod:`.catalog`, which builds a
strategy by name for a task kind.
"""

ISAL = "isal"
ISAL_PAPER = "isal-paper"
RANDOM = "random"
ENTROPY = "entropy"
MARGIN = "margin"
LEAST_CONFIDENCE = "least-confidence"
CORESET = "coreset"
#: Typical-first (TypiClust, Hacohen et al., ICML 2022): the densest image of each of k clusters.
TYPICAL = "typical"
#: Detection's uncertainty sampling (lowest mean box score first): the form the three classification
#: uncertainty measures take for a detector, which has no posterior over a fixed set of classes.
MEAN_CONFIDENCE = "mean-confidence"

#: What ``ISAL_STRATEGY`` accepts, for every task kind.
STRATEGIES = (ISAL, ISAL_PAPER, RANDOM, ENTROPY, MARGIN, LEAST_CONFIDENCE, CORESET, TYPICAL)
#: Orders that need no label: what a round uses until a model can be had (``ISAL_COLD_START``).
COLD_STARTS = (TYPICAL, CORESET, RANDOM)
#: Every strategy a benchmark can run (``mean-confidence`` is a detection name for least-confidence).
ALL_STRATEGIES = (*STRATEGIES, MEAN_CONFIDENCE)
#: Strategies that score with influence (they need a reference set held out from training).
INFLUENCE_STRATEGIES = (ISAL, ISAL_PAPER)
UNCERTAINTY_STRATEGIES = (ENTROPY, MARGIN, LEAST_CONFIDENCE)

__all__ = [
    "ALL_STRATEGIES",
    "COLD_STARTS",
    "CORESET",
    "ENTROPY",
    "INFLUENCE_STRATEGIES",
    "ISAL",
    "ISAL_PAPER",
    "LEAST_CONFIDENCE",
    "MARGIN",
    "MEAN_CONFIDENCE",
    "RANDOM",
    "STRATEGIES",
    "TYPICAL",
    "UNCERTAINTY_STRATEGIES",
]
