"""Baselines with the same interface as ISAL: random, uncertainty sampling, core-set."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from isal_backend.strategies import CORESET, ENTROPY, LEAST_CONFIDENCE, MARGIN, MEAN_CONFIDENCE, RANDOM
from isal_backend.strategies.base import PoolView, Strategy, ascending


class RandomStrategy(Strategy):
    name = RANDOM
    needs_model: ClassVar[bool] = False

    def order(self, view: PoolView, count: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).permutation(view.size)[:count]


class EntropyStrategy(Strategy):
    """Highest predictive entropy first."""

    name = ENTROPY

    def keys(self, view: PoolView) -> torch.Tensor:
        p = view.probabilities()
        return (p * torch.log(p.clamp_min(1e-12))).sum(dim=1)  # minus the entropy: ascending

    def order(self, view: PoolView, count: int, seed: int) -> np.ndarray:
        return ascending(self.keys(view), count, seed)


class MarginStrategy(Strategy):
    """Smallest gap between the two most probable classes first."""

    name = MARGIN

    def keys(self, view: PoolView) -> torch.Tensor:
        top2 = view.probabilities().topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]

    def order(self, view: PoolView, count: int, seed: int) -> np.ndarray:
        return ascending(self.keys(view), count, seed)


class LeastConfidenceStrategy(Strategy):
    """Lowest confidence first: the top-class probability, or a detector's mean box score."""

    name = LEAST_CONFIDENCE

    def keys(self, view: PoolView) -> torch.Tensor:
        return view.confidence()

    def order(self, view: PoolView, count: int, seed: int) -> np.ndarray:
        return ascending(self.keys(view), count, seed)


class MeanConfidenceStrategy(LeastConfidenceStrategy):
    """A detector's uncertainty sampling: lowest mean post-NMS box score first (no box: confidence 0)."""

    name = MEAN_CONFIDENCE


def k_center_greedy(
    pool: torch.Tensor, centers: torch.Tensor, count: int, seed: int = 0, chunk: int = 8192
) -> np.ndarray:
    """Greedy k-center (Sener & Savarese 2018): repeatedly take the pool point farthest from all centers.

    With no centers the first pick is a seeded random point. Cost O(count * n * d).
    """
    n = pool.shape[0]
    count = min(count, n)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    pool = pool.float()
    sq = (pool * pool).sum(dim=1)

    def distances_to(points: torch.Tensor) -> torch.Tensor:
        best = torch.full((n,), float("inf"))
        pts = points.float()
        psq = (pts * pts).sum(dim=1)
        for s in range(0, pts.shape[0], chunk):
            d = sq[:, None] - 2 * pool @ pts[s : s + chunk].T + psq[None, s : s + chunk]
            best = torch.minimum(best, d.min(dim=1).values)
        return best.clamp_min(0)

    chosen: list[int] = []
    if centers.shape[0]:
        nearest = distances_to(centers)
    else:
        first = int(np.random.default_rng(seed).integers(n))
        chosen.append(first)
        nearest = distances_to(pool[first : first + 1])
        nearest[first] = -1.0
    while len(chosen) < count:
        idx = int(torch.argmax(nearest))
        chosen.append(idx)
        nearest = torch.minimum(nearest, distances_to(pool[idx : idx + 1]))
        nearest[idx] = -1.0
    return np.asarray(chosen[:count], dtype=np.int64)


class CoresetStrategy(Strategy):
    """Greedy k-center on the kind's embeddings: covers the data; needs no labels (the cold-start order)."""

    name = CORESET
    needs_model: ClassVar[bool] = False

    def order(self, view: PoolView, count: int, seed: int) -> np.ndarray:
        pool, labeled = view.embeddings()
        return k_center_greedy(pool, labeled, count, seed)
