"""Baselines with the same interface as ISAL: random, uncertainty sampling, core-set."""

from __future__ import annotations

import numpy as np
import torch

from isal_backend.strategies.base import PoolState, Strategy, ascending


class RandomStrategy(Strategy):
    name = "random"
    needs_labels = False

    def rank(self, state: PoolState, count: int) -> np.ndarray:
        return np.random.default_rng(state.seed).permutation(state.pool_size)[:count]


class EntropyStrategy(Strategy):
    """Highest predictive entropy first."""

    name = "entropy"

    def rank(self, state: PoolState, count: int) -> np.ndarray:
        p = state.pool_probs()
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)
        return ascending(-entropy, count, state.seed)


class MarginStrategy(Strategy):
    """Smallest gap between the two most probable classes first."""

    name = "margin"

    def rank(self, state: PoolState, count: int) -> np.ndarray:
        top2 = state.pool_probs().topk(2, dim=1).values
        return ascending(top2[:, 0] - top2[:, 1], count, state.seed)


class LeastConfidenceStrategy(Strategy):
    """Lowest top-class probability first."""

    name = "least-confidence"

    def rank(self, state: PoolState, count: int) -> np.ndarray:
        return ascending(state.pool_probs().max(dim=1).values, count, state.seed)


def k_center_greedy(
    pool: torch.Tensor, centers: torch.Tensor, count: int, seed: int = 0, chunk: int = 8192
) -> np.ndarray:
    """Greedy k-center (Sener & Savarese 2018): repeatedly take the pool point farthest from all centers.

    With no centers the first pick is a seeded random point. Cost O(count * n * d).
    """
    n = pool.shape[0]
    count = min(count, n)
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
    while len(chosen) < count:
        idx = int(torch.argmax(nearest))
        chosen.append(idx)
        nearest = torch.minimum(nearest, distances_to(pool[idx : idx + 1]))
        nearest[idx] = -1.0
    return np.asarray(chosen[:count], dtype=np.int64)


class CoresetStrategy(Strategy):
    """Greedy k-center on features: covers the data; needs no labels (the cold-start order)."""

    name = "coreset"
    needs_labels = False

    def rank(self, state: PoolState, count: int) -> np.ndarray:
        return k_center_greedy(state.pool_features, state.labeled_features, count, state.seed)
