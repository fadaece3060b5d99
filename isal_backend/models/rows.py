"""Feature rows of a round's tasks, read as late and as little as the round needs.

A classification round over 100,000 tasks needs the pool's PROJECTED features (128 numbers a task),
but their raw backbone features (1,280 a task) only for the images it has not projected yet, and for a
fixed sample of at most 4,096 when the projection is refitted. So a round holds the cache keys of its
tasks and asks a :class:`FeatureRows` for what it needs: :class:`CachedRows` reads the feature cache
and keeps, per process and per projection, a table of projected rows that grows as images arrive (a
long-lived worker projects each image once). :class:`MatrixRows` holds features in memory (tests,
small tools).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import torch

from isal_backend.models.projection import Projection
from isal_backend.store import FeatureCache


class FeatureRows(Protocol):
    """Where a round's feature rows come from, by cache key."""

    @property
    def dim(self) -> int:
        """Width of the raw features."""
        ...

    def raw(self, keys: list[str]) -> torch.Tensor:
        """Raw features, float32, one row per key."""
        ...

    def projected(self, keys: list[str], projection: Projection | None) -> torch.Tensor:
        """Features through ``projection`` (None: raw), float64, one row per key."""
        ...


class ProjectedTable:
    """One process's projected rows of one feature cache under one projection: key -> row, appended to."""

    _shared: dict[tuple[Path, str], ProjectedTable] = {}
    _shared_lock = threading.Lock()
    #: Tables kept per process (older projections of a project are dropped first).
    MAX_TABLES = 8

    def __init__(self, dim: int) -> None:
        self.index: dict[str, int] = {}
        self.rows = torch.zeros(0, dim, dtype=torch.float32)
        self.lock = threading.Lock()

    @classmethod
    def shared(cls, folder: Path, projection: Projection) -> ProjectedTable:
        key = (folder, projection.key)
        with cls._shared_lock:
            table = cls._shared.get(key)
            if table is None:
                while len(cls._shared) >= cls.MAX_TABLES:
                    cls._shared.pop(next(iter(cls._shared)))
                table = cls._shared[key] = cls(projection.dim)
            return table

    def gather(self, keys: list[str], compute: callable) -> torch.Tensor:
        """Rows of ``keys``; those not in the table yet come from ``compute(missing keys)`` and are kept."""
        with self.lock:
            missing = list(dict.fromkeys(k for k in keys if k not in self.index))
            if missing:
                fresh = compute(missing).float()
                start = self.rows.shape[0]
                self.rows = torch.cat([self.rows, fresh])
                self.index.update({k: start + i for i, k in enumerate(missing)})
            positions = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
            return self.rows.index_select(0, positions).double()


class CachedRows:
    """Rows from a :class:`~isal_backend.store.FeatureCache`, projected ones kept per process."""

    def __init__(self, cache: FeatureCache, dim: int) -> None:
        self.cache = cache
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def raw(self, keys: list[str]) -> torch.Tensor:
        rows, found = self.cache.matrix(keys, self._dim)
        if not bool(found.all()):
            raise KeyError(f"{int((~found).sum())} of {len(keys)} feature rows are not in {self.cache.folder}")
        return rows

    def projected(self, keys: list[str], projection: Projection | None) -> torch.Tensor:
        if projection is None:
            return self.raw(keys).double()
        table = ProjectedTable.shared(self.cache.folder, projection)
        return table.gather(keys, lambda missing: projection(self.raw(missing)))


class MatrixRows:
    """Rows held in memory, by key."""

    def __init__(self, keys: list[str], features: torch.Tensor) -> None:
        if len(keys) != features.shape[0]:
            raise ValueError(f"{len(keys)} keys for {features.shape[0]} feature rows")
        self.features = features.float()
        self.index = {k: i for i, k in enumerate(keys)}

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def raw(self, keys: list[str]) -> torch.Tensor:
        return self.features[torch.tensor([self.index[k] for k in keys], dtype=torch.long)].reshape(-1, self.dim)

    def projected(self, keys: list[str], projection: Projection | None) -> torch.Tensor:
        raw = self.raw(keys)
        return raw.double() if projection is None else projection(raw)
