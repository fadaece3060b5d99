"""Inverse-Hessian-vector solvers: ``s_test = (H + lambda I)^-1 v``.

Two families, both needing only :meth:`InfluenceProblem.hvp`:

* exact: conjugate gradient to a relative residual, or a Cholesky factorisation of the dense
  matrix when the parameter count is small;
* LiSSA (Agarwal et al. 2017) as the ISAL authors ran it, with their settings as the ``"paper"``
  preset. Its recursion ``h <- v + (1 - damp) h - H_batch h / scale`` converges to
  ``scale * (H + scale*damp*I)^-1 v``: a damping of ``scale*damp`` (100 with the paper's
  settings), not the training weight decay, and no division by ``scale`` at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from isal_backend.influence.base import InfluenceProblem

#: Above this parameter count a dense Cholesky costs more than CG.
CHOLESKY_MAX_DIM = 2048


@dataclass(frozen=True)
class LissaConfig:
    """Settings of the stochastic LiSSA recursion."""

    damp: float = 0.01
    scale: float = 1e4
    depth: int = 250
    repeats: int = 4
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise ValueError(f"LiSSA damp must be in [0, 1), got {self.damp}")
        if self.scale <= 0 or self.depth < 1 or self.repeats < 1 or self.batch_size < 1:
            raise ValueError(f"LiSSA scale, depth, repeats and batch_size must be positive: {self}")


#: The ISAL authors' classification settings.
PAPER_LISSA = LissaConfig(damp=0.01, scale=1e4, depth=250, repeats=4, batch_size=1)


@dataclass
class SolveReport:
    """What a solve cost and how well it did."""

    method: str
    seconds: float
    iterations: int
    relative_residual: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def conjugate_gradient(
    problem: InfluenceProblem,
    v: torch.Tensor,
    damping: float = 0.0,
    tol: float = 1e-8,
    max_iter: int | None = None,
) -> tuple[torch.Tensor, SolveReport]:
    """Solve ``(H + weight_decay I + damping I) x = v`` by CG (H is PSD, so this is SPD)."""
    start = time.perf_counter()
    max_iter = max_iter or max(10 * problem.dim, 100)

    def matvec(x: torch.Tensor) -> torch.Tensor:
        out = problem.hvp(x)
        return out + damping * x if damping else out

    x = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    v_norm = torch.linalg.vector_norm(v).item() or 1.0
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported below
        if torch.sqrt(rs).item() / v_norm <= tol:
            iterations -= 1
            break
        ap = matvec(p)
        alpha = rs / torch.dot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.dot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    residual = torch.linalg.vector_norm(v - matvec(x)).item() / v_norm
    return x, SolveReport("cg", time.perf_counter() - start, iterations, residual)


def cholesky_solve(
    problem: InfluenceProblem, v: torch.Tensor, damping: float = 0.0
) -> tuple[torch.Tensor, SolveReport]:
    """Exact solve through the dense matrix; only for ``dim <= CHOLESKY_MAX_DIM``."""
    if problem.dim > CHOLESKY_MAX_DIM:
        raise ValueError(
            f"Cholesky needs the dense {problem.dim}x{problem.dim} Hessian; above "
            f"{CHOLESKY_MAX_DIM} parameters use conjugate gradient (solver='cg')"
        )
    start = time.perf_counter()
    matrix = problem.dense_hessian()
    matrix = 0.5 * (matrix + matrix.T)
    if damping:
        matrix = matrix + damping * torch.eye(problem.dim, dtype=matrix.dtype)
    factor = torch.linalg.cholesky(matrix)
    x = torch.cholesky_solve(v.unsqueeze(1), factor).squeeze(1)
    residual = (torch.linalg.vector_norm(matrix @ x - v) / torch.linalg.vector_norm(v)).item()
    return x, SolveReport("cholesky", time.perf_counter() - start, 1, residual)


def lissa(
    problem: InfluenceProblem,
    v: torch.Tensor,
    config: LissaConfig = PAPER_LISSA,
    seed: int = 0,
) -> tuple[torch.Tensor, SolveReport]:
    """LiSSA as the ISAL authors ran it: averaged repeats of a depth-limited recursion."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    n = problem.num_train
    total = torch.zeros_like(v)
    for _ in range(config.repeats):
        h = v.clone()
        for _ in range(config.depth):
            batch = None
            if config.batch_size < n:
                batch = torch.randint(0, n, (config.batch_size,), generator=generator)
            h = v + (1.0 - config.damp) * h - problem.hvp(h, batch) / config.scale
        total += h
    estimate = total / config.repeats
    return estimate, SolveReport(
        "lissa",
        time.perf_counter() - start,
        config.depth * config.repeats,
        extra={"damp": config.damp, "scale": config.scale},
    )


def lissa_fixed_point(problem: InfluenceProblem, v: torch.Tensor, config: LissaConfig) -> torch.Tensor:
    """The exact limit of :func:`lissa`: ``scale * (H + scale*damp*I)^-1 v``."""
    x, _ = conjugate_gradient(problem, v, damping=config.scale * config.damp, tol=1e-12)
    return config.scale * x


def solve_s_test(
    problem: InfluenceProblem,
    solver: str = "cg",
    lissa_config: LissaConfig = PAPER_LISSA,
    tol: float = 1e-8,
    seed: int = 0,
) -> tuple[torch.Tensor, SolveReport]:
    """``s_test`` for the problem's reference gradient with the named solver."""
    v = problem.reference_gradient()
    if solver == "cg":
        return conjugate_gradient(problem, v, tol=tol)
    if solver == "cholesky":
        return cholesky_solve(problem, v)
    if solver == "auto":
        if problem.dim <= CHOLESKY_MAX_DIM:
            return cholesky_solve(problem, v)
        return conjugate_gradient(problem, v, tol=tol)
    if solver == "lissa":
        return lissa(problem, v, lissa_config, seed=seed)
    raise ValueError(f"unknown s_test solver {solver!r}: choose one of cg, cholesky, auto, lissa")
