"""Where the benchmarks (and the tests that use real data) find data files: one setting, ``ISAL_DATA_ROOT``."""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable naming the folder of data archives (CIFAR-10, BCCD).
DATA_ROOT_VARIABLE = "ISAL_DATA_ROOT"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """``data_root``, else ``$ISAL_DATA_ROOT``, else ``<repo>/../shared/data`` (where CI keeps it)."""
    if data_root:
        return Path(data_root).expanduser()
    if os.environ.get(DATA_ROOT_VARIABLE):
        return Path(os.environ[DATA_ROOT_VARIABLE]).expanduser()
    return repo_root().parent / "shared" / "data"


def cache_dir() -> Path:
    """Where benchmarks keep features between runs (``$ISAL_CACHE_DIR``, default ``~/.cache/isal_backend``)."""
    return Path(os.environ.get("ISAL_CACHE_DIR") or Path.home() / ".cache" / "isal_backend" / "features")
