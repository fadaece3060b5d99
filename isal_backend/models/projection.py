"""Project a task pool's backbone features onto their top principal components (no label is used).

Why: on 1280-d EfficientNet-Lite0 features, 128 components keep a linear head's accuracy (CIFAR-10:
58.1/71.4% at 200/2200 labels against 59.1/71.4% on all 1280) and make every head fit, ISAL's
cross-fitting included, 10-100x cheaper; scaled to unit mean variance, one weight decay fits every
backbone. Fitted on at most ``max_rows`` features (a fixed-seed sample) so its cost stays flat as the
pool grows, and refitted only when the pool's size moved by more than ``REFIT_CHANGE``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

#: Refit when the number of featurized tasks changed by more than this share since the fit.
REFIT_CHANGE = 0.1
MAX_ROWS = 4096


@dataclass(frozen=True, eq=False)
class Projection:
    """``x -> (x - mean) @ basis / scale``: computed in float32 (features are stored as float32; a 100,000 x 1280
    pool would be a gigabyte in float64), returned as float64 for the heads."""

    mean: torch.Tensor  # (d,)
    basis: torch.Tensor  # (d, k)
    scale: torch.Tensor  # () sqrt of the kept components' mean variance
    fitted_on: int  # how many feature rows the pool had when it was fitted
    explained: float  # share of the variance the kept components carry
    #: Names this fit (stored with the round): projected rows cached under it stay valid while it is in use.
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def in_dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float() - self.mean.float()
        return (x @ (self.basis / self.scale).float()).double()

    def still_fits(self, rows: int, in_dim: int) -> bool:
        """Whether this projection may be reused for a pool of ``rows`` features of width ``in_dim``."""
        return in_dim == self.in_dim and abs(rows - self.fitted_on) <= REFIT_CHANGE * self.fitted_on

    @staticmethod
    def sample(rows: int, max_rows: int = MAX_ROWS, seed: int = 0) -> np.ndarray:
        """The rows a fit over ``rows`` features reads: all, or a fixed-seed sample of ``max_rows``."""
        if rows <= max_rows:
            return np.arange(rows)
        return np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))

    @classmethod
    def fit(cls, features: torch.Tensor, dim: int, max_rows: int = MAX_ROWS, seed: int = 0,
            rows: int | None = None) -> Projection:
        """PCA to at most ``dim`` components of (a fixed-seed sample of at most ``max_rows`` of) ``features``.

        ``rows``: the pool's size when ``features`` is already its :meth:`sample` (the caller read only those).
        """
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"a projection needs at least 2 feature rows, got shape {tuple(features.shape)}")
        sample = features if rows is not None else features[Projection.sample(features.shape[0], max_rows, seed)]
        rows = rows if rows is not None else features.shape[0]
        x = sample.double()
        mean = x.mean(dim=0)
        centered = x - mean
        k = min(dim, x.shape[1], x.shape[0] - 1)
        if x.shape[0] < x.shape[1]:  # few rows, wide features: the thin SVD is the cheap way
            _, sing, vh = torch.linalg.svd(centered, full_matrices=False)
            eigval, eigvec = (sing**2 / (x.shape[0] - 1)).flip(0), vh.T.flip(1)
        else:
            eigval, eigvec = torch.linalg.eigh(centered.T @ centered / (x.shape[0] - 1))
        eigval = eigval.clamp_min(0)
        basis, var = eigvec[:, -k:].flip(1).contiguous(), eigval[-k:].flip(0)
        scale = var.mean().sqrt() if float(var.mean()) > 0 else torch.tensor(1.0, dtype=torch.float64)
        total = float(eigval.sum())
        return cls(mean, basis, scale, rows, round(float(var.sum()) / total, 4) if total > 0 else 1.0)
