"""ISAL influence math: knows torch, nothing of Label Studio."""

from isal_backend.influence.autograd import AutogradInfluence, select_parameters
from isal_backend.influence.base import CURVATURES, InfluenceProblem, TopKError, check_top_k
from isal_backend.influence.head import HeadInfluence, LinearHead, fit_linear_head, score_head
from isal_backend.influence.solvers import (
    PAPER,
    PAPER_LISSA,
    LissaConfig,
    SolverConfig,
    SolveReport,
    cg,
    cholesky_solve,
    conjugate_gradient,
    lissa,
    lissa_fixed_point,
    solve_s_test,
)

__all__ = [
    "CURVATURES",
    "PAPER",
    "PAPER_LISSA",
    "AutogradInfluence",
    "HeadInfluence",
    "InfluenceProblem",
    "LinearHead",
    "LissaConfig",
    "SolveReport",
    "SolverConfig",
    "TopKError",
    "cg",
    "check_top_k",
    "cholesky_solve",
    "conjugate_gradient",
    "fit_linear_head",
    "lissa",
    "lissa_fixed_point",
    "score_head",
    "select_parameters",
    "solve_s_test",
]
