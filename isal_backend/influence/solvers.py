"""Inverse-curvature-vector solvers: ``s_test = (C + lambda I)^-1 v``, C the Hessian or the Gauss-Newton matrix.

One set of solvers for every :class:`~isal_backend.influence.base.InfluenceProblem` (a classifier's
head, a whole network through autograd, a detector's final convs); they only need
:meth:`~isal_backend.influence.base.InfluenceProblem.curvature_vp`:

* exact: :func:`cg`, the one conjugate gradient (optionally preconditioned by the problem's own
  preconditioner; it keeps the best iterate and reports its TRUE residual), or a Cholesky factorisation
  of the dense matrix when the parameter count is small;
* LiSSA (Agarwal et al. 2017) as the ISAL authors ran it, with their settings as the ``"paper"``
  preset. Its recursion ``h <- v + (1 - damp) h - H_batch h / scale`` converges to
  ``scale * (H + scale*damp*I)^-1 v``: a damping of ``scale*damp`` (100 with the paper's
  settings), not the training weight decay, and no division by ``scale`` at the end. It runs on the
  exact Hessian, as the authors did.

:func:`solve_s_test` picks one by a :class:`SolverConfig`; :data:`PAPER` is the authors' preset.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from isal_backend.influence.base import CURVATURES, InfluenceProblem

#: Above this parameter count a dense Cholesky costs more than CG.
CHOLESKY_MAX_DIM = 2048
METHODS = ("cg", "cholesky", "auto", "lissa")


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


@dataclass(frozen=True)
class SolverConfig:
    """How ``s_test`` is solved: method, curvature, accuracy; one object for every kind of model."""

    method: str = "cg"  # cg | cholesky | auto (Cholesky when small) | lissa
    curvature: str = "hessian"  # hessian | ggn (PSD Gauss-Newton; needed where the Hessian is indefinite)
    tol: float = 1e-8  # relative residual at which CG stops
    max_iter: int | None = None  # CG products; None: 10 x dim (at least 100)
    precondition: bool = True  # use the problem's preconditioner when it offers one
    lissa: LissaConfig = PAPER_LISSA
    seed: int = 0  # LiSSA's mini-batches

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown s_test solver {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.tol <= 0 or (self.max_iter is not None and self.max_iter < 1):
            raise ValueError(f"tol must be positive and max_iter at least 1: {self}")

    def with_seed(self, seed: int) -> SolverConfig:
        return replace(self, seed=seed)

    def describe(self) -> dict[str, object]:
        """JSON-ready, for recipes and reports."""
        out: dict[str, object] = {"method": self.method, "curvature": self.curvature}
        if self.method == "lissa":
            out["lissa"] = {"damp": self.lissa.damp, "scale": self.lissa.scale, "depth": self.lissa.depth,
                            "repeats": self.lissa.repeats, "batch_size": self.lissa.batch_size}
        else:
            out.update({"tol": self.tol, "max_iter": self.max_iter, "precondition": self.precondition})
        return out


#: The authors' preset: LiSSA with their settings on the exact Hessian.
PAPER = SolverConfig(method="lissa", curvature="hessian", lissa=PAPER_LISSA)


@dataclass
class SolveReport:
    """What a solve cost and how well it did."""

    method: str
    seconds: float
    iterations: int
    relative_residual: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def cg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    v: torch.Tensor,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tol: float = 1e-8,
    max_iter: int = 200,
) -> tuple[torch.Tensor, SolveReport]:
    """Conjugate gradient for a symmetric POSITIVE DEFINITE ``A x = v``, preconditioned when given ``~A^-1``.

    Returns the iterate with the smallest residual seen (CG's residual is not monotone) and reports its
    TRUE relative residual ``|v - A x| / |v|``, recomputed with one more product. Stops at ``tol`` or on
    a breakdown (zero curvature along a search direction). A direction of negative curvature means the
    matrix is not definite: CG carries on (it may still converge on a mildly indefinite system) and the
    report says so through ``extra["indefinite"] = 1``.
    """
    start = time.perf_counter()
    v_norm = torch.linalg.vector_norm(v).item()
    method = "pcg" if precondition is not None else "cg"
    if v_norm == 0.0:
        return torch.zeros_like(v), SolveReport(method, time.perf_counter() - start, 0, 0.0,
                                                extra={"best_iteration": 0.0, "indefinite": 0.0})
    precond = precondition or (lambda r: r)
    x = torch.zeros_like(v)
    r = v.clone()
    z = precond(r)
    p = z.clone()
    rz = torch.dot(r, z)
    best, best_residual, best_iteration, indefinite = x, 1.0, 0, 0.0
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported below
        ap = matvec(p)
        curvature = torch.dot(p, ap)
        if curvature == 0:
            break
        if curvature < 0:
            indefinite = 1.0
        alpha = rz / curvature
        x = x + alpha * p
        r = r - alpha * ap
        residual = torch.linalg.vector_norm(r).item() / v_norm
        if residual < best_residual:
            best, best_residual, best_iteration = x, residual, iterations
        if residual <= tol:
            break
        z = precond(r)
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    true_residual = torch.linalg.vector_norm(v - matvec(best)).item() / v_norm
    return best, SolveReport(method, time.perf_counter() - start, iterations, true_residual,
                             extra={"best_iteration": float(best_iteration), "indefinite": indefinite})


def conjugate_gradient(
    problem: InfluenceProblem,
    v: torch.Tensor,
    damping: float = 0.0,
    tol: float = 1e-8,
    max_iter: int | None = None,
    curvature: str = "hessian",
    precondition: bool = True,
) -> tuple[torch.Tensor, SolveReport]:
    """Solve ``(C + weight_decay I + damping I) x = v`` by :func:`cg` with the problem's curvature products."""
    max_iter = max_iter or max(10 * problem.dim, 100)

    def matvec(x: torch.Tensor) -> torch.Tensor:
        out = problem.curvature_vp(x, curvature)
        return out + damping * x if damping else out

    preconditioner = problem.preconditioner(curvature) if precondition and not damping else None
    return cg(matvec, v, preconditioner, tol=tol, max_iter=max_iter)


def cholesky_solve(
    problem: InfluenceProblem, v: torch.Tensor, damping: float = 0.0, curvature: str = "hessian"
) -> tuple[torch.Tensor, SolveReport]:
    """Exact solve through the dense matrix; only for ``dim <= CHOLESKY_MAX_DIM``."""
    if problem.dim > CHOLESKY_MAX_DIM:
        raise ValueError(
            f"Cholesky needs the dense {problem.dim}x{problem.dim} matrix; above "
            f"{CHOLESKY_MAX_DIM} parameters use conjugate gradient (solver='cg')"
        )
    start = time.perf_counter()
    matrix = problem.dense_curvature(curvature)
    matrix = 0.5 * (matrix + matrix.T)
    if damping:
        matrix = matrix + damping * torch.eye(problem.dim, dtype=matrix.dtype)
    factor = torch.linalg.cholesky(matrix)
    x = torch.cholesky_solve(v.unsqueeze(1).to(matrix.dtype), factor).squeeze(1).to(v.dtype)
    residual = (torch.linalg.vector_norm(matrix @ x.to(matrix.dtype) - v) / torch.linalg.vector_norm(v)).item()
    return x, SolveReport("cholesky", time.perf_counter() - start, 1, residual)


def lissa(
    problem: InfluenceProblem,
    v: torch.Tensor,
    config: LissaConfig = PAPER_LISSA,
    seed: int = 0,
) -> tuple[torch.Tensor, SolveReport]:
    """LiSSA as the ISAL authors ran it: averaged repeats of a depth-limited recursion on the exact Hessian."""
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


def solve_s_test(problem: InfluenceProblem, config: SolverConfig = SolverConfig()) -> tuple[torch.Tensor, SolveReport]:
    """``s_test`` for the problem's reference gradient, solved as ``config`` says."""
    v = problem.reference_gradient()
    if config.method == "lissa":
        return lissa(problem, v, config.lissa, seed=config.seed)
    if config.method == "cholesky" or (config.method == "auto" and problem.dim <= CHOLESKY_MAX_DIM):
        return cholesky_solve(problem, v, curvature=config.curvature)
    return conjugate_gradient(problem, v, tol=config.tol, max_iter=config.max_iter, curvature=config.curvature,
                              precondition=config.precondition)
