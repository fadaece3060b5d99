"""The one abstract influence problem every ISAL strategy works on.

An :class:`InfluenceProblem` owns a parameter vector theta (flattened) of a trained model and
answers the three questions ISAL asks of it:

* ``reference_gradient()``: ``grad L(R)``, the SUM of per-sample loss gradients over the
  labeled reference set R;
* ``hvp(v, batch)``: ``(H + weight_decay I) v`` with H the Hessian of the training loss, on the
  whole training set or on a mini-batch of it (LiSSA uses batches of one);
* optionally ``ggn_vp(v)``: the same with the generalised Gauss-Newton matrix G in place of H (PSD by
  construction: what CG needs when H is indefinite, as a detector's is), and ``preconditioner(curvature)``;
* ``score(s_test, pool)``: ``I(z) = -s_test^T G_z`` for every pool sample, with ``G_z`` the
  posterior-weighted expected gradient over the top-K predicted classes.

Solvers (:mod:`isal_backend.influence.solvers`) only need :meth:`InfluenceProblem.curvature_vp` and
``dim``, so every kind of model shares one CG, one Cholesky, one LiSSA and their tests; the subclasses
decide how gradients are had: a closed form for a softmax linear head
(:mod:`.head`) or ``torch.func`` per-sample gradients for any named parameter set (:mod:`.autograd`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

#: What ``s_test`` inverts: the exact Hessian, or the generalised Gauss-Newton matrix (PSD by construction).
CURVATURES = ("hessian", "ggn")


class TopKError(ValueError):
    """K for the expected gradient is out of range."""


def check_top_k(top_k: int, num_classes: int) -> int:
    """Refuse a K that makes the expected gradient vanish or is meaningless.

    With K = C and no label smoothing ``sum_k p_k (p - e_k) = p - p = 0`` for softmax
    cross-entropy, so every score would be exactly zero.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise TopKError(f"top_k must be a positive integer, got {top_k!r}")
    if top_k >= num_classes:
        raise TopKError(
            f"top_k={top_k} must be smaller than the number of classes ({num_classes}): with "
            "top_k >= classes the posterior-weighted expected gradient of softmax cross-entropy "
            "is exactly zero, so every ISAL score would be 0. Use top_k=1 (the authors' setting)."
        )
    return top_k


class InfluenceProblem(ABC):
    """Influence of unlabeled samples on a reference loss, for one trained model."""

    #: L2 weight decay of the training objective; part of the Hessian.
    weight_decay: float

    @property
    @abstractmethod
    def dim(self) -> int:
        """Number of parameters influence is taken over."""

    @property
    @abstractmethod
    def num_train(self) -> int:
        """Number of training samples (mini-batches of ``hvp`` index into them)."""

    @abstractmethod
    def reference_gradient(self) -> torch.Tensor:
        """``grad L(R)``: the sum over the reference set of per-sample gradients, flat."""

    @abstractmethod
    def hvp(self, vector: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """``(H_batch + weight_decay I) vector``; ``batch`` indexes training samples, None = all."""

    @abstractmethod
    def score(self, s_test: torch.Tensor, top_k: int = 1) -> torch.Tensor:
        """``-s_test^T G_z`` for each pool sample; the most negative is the most valuable."""

    def ggn_vp(self, vector: torch.Tensor) -> torch.Tensor:
        """``(G + weight_decay I) vector`` with G the generalised Gauss-Newton matrix of the training loss."""
        raise NotImplementedError(f"{type(self).__name__} has no Gauss-Newton curvature: use curvature='hessian'")

    def curvature_vp(self, vector: torch.Tensor, curvature: str = "hessian") -> torch.Tensor:
        """The product the solvers invert, for ``curvature`` in :data:`CURVATURES`."""
        if curvature == "hessian":
            return self.hvp(vector)
        if curvature == "ggn":
            return self.ggn_vp(vector)
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")

    def preconditioner(self, curvature: str = "hessian") -> Callable[[torch.Tensor], torch.Tensor] | None:
        """An approximation of ``x -> (curvature + weight_decay I)^-1 x`` for CG, or None (plain CG)."""
        return None

    def dense_curvature(self, curvature: str = "hessian") -> torch.Tensor:
        """The full matrix behind :meth:`curvature_vp`, from ``dim`` products (small problems only)."""
        eye = torch.eye(self.dim, dtype=self.dtype)
        return torch.stack([self.curvature_vp(eye[i], curvature) for i in range(self.dim)], dim=1)

    def dense_hessian(self) -> torch.Tensor:
        """The full ``H + weight_decay I`` matrix (for small problems)."""
        return self.dense_curvature("hessian")

    @property
    def dtype(self) -> torch.dtype:
        return self.reference_gradient().dtype
