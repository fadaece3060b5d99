"""Baselines with the same interface as ISAL: random, uncertainty sampling, core-set."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from isal_backend.strategies import CORESET, ENTROPY, LEAST_CONFIDENCE, MARGIN, MEAN_CONFIDENCE, RANDOM, TYPICAL
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


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 20) -> torch.Tensor:
    """Cluster index of each point (Lloyd's k-means, k-means++ seeding); cost O(iterations * n * k * d)."""
    n = points.shape[0]
    x = points.float()
    rng = np.random.default_rng(seed)
    centers = [int(rng.integers(n))]
    nearest = ((x - x[centers[0]]) ** 2).sum(dim=1)
    for _ in range(1, k):
        weights = nearest.clamp_min(0).numpy().astype(np.float64)
        total = weights.sum()
        pick = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        centers.append(pick)
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(dim=1))
    c = x[centers].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        distance = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]
        new = distance.argmin(dim=1)
        if torch.equal(new, assign) and _ > 0:
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(dim=0)
    return assign


class TypicalStrategy(Strategy):
    """Typical-first (TypiClust): k clusters of the pool, then in each its most typical image, largest clusters first.

    At tiny budgets the first labels should show what the data mostly looks like: core-set's farthest
    points are its outliers. Typicality is the inverse mean distance to the 20 nearest neighbours within the
    cluster. The first ``min(count, MAX_CLUSTERS)`` places hold one typical image per cluster (labeled
    images' clusters last); the rest of the order is core-set, so it still covers the data.
    """

    name = TYPICAL
    needs_model = False
    MAX_CLUSTERS = 100
    NEIGHBOURS = 20
    #: Members of a cluster its typicality is measured on (a cluster of 50,000 would need a 10 GB distance matrix).
    SAMPLE = 2000

    def order(self, view: PoolView, count: int, seed: int) -> np.ndarray:
        pool, labeled = view.embeddings()
        n = pool.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        k = max(1, min(count, self.MAX_CLUSTERS, n))
        x = pool.float()
        assign = kmeans(x, k, seed)
        clusters = [int(c) for c in torch.unique(assign)]
        centroids = torch.stack([x[assign == c].mean(dim=0) for c in clusters])
        covered: set[int] = set()
        if labeled.shape[0]:  # a cluster a label already sits in comes after the ones none does
            covered = {clusters[int(j)] for j in torch.cdist(labeled.float(), centroids).argmin(dim=1)}
        first: list[tuple[int, int, int]] = []  # (covered, -size, the cluster's most typical image)
        rng = np.random.default_rng(seed)
        for cluster in clusters:
            members = torch.nonzero(assign == cluster).flatten()
            size = len(members)
            if size > self.SAMPLE:
                members = members[torch.from_numpy(np.sort(rng.choice(len(members), self.SAMPLE, replace=False)))]
            distance = torch.cdist(x[members], x[members])
            nearest = distance.topk(min(self.NEIGHBOURS + 1, len(members)), largest=False).values[:, 1:]
            typicality = 1.0 / (nearest.mean(dim=1) + 1e-12) if nearest.shape[1] else torch.ones(len(members))
            first.append((int(cluster in covered), -size, int(members[int(typicality.argmax())])))
        picks = [i for _, _, i in sorted(first)][:count]
        if len(picks) >= count:
            return np.asarray(picks, dtype=np.int64)
        chosen = set(picks)
        centers = torch.cat([labeled.float(), x[picks]]) if labeled.shape[0] else x[picks]
        rest = [int(i) for i in k_center_greedy(pool, centers, count, seed) if int(i) not in chosen]
        return np.asarray((picks + rest)[:count], dtype=np.int64)
