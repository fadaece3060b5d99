"""Memory of image downloads that failed, so a round does not fetch a broken image again every time.

An oversized third-party image costs 64 MiB per attempt and a dead host a whole download deadline; without
a memory every round pays that again for every such task.  :class:`FailedDownloads` keeps, per URL, why and
when its download failed, in one small JSON file per project (the round code keeps it at
``MODEL_DIR/projects/<id>/failed-images.json``, see :meth:`FailedDownloads.for_project`).  Keys are SHA-256
hashes of the task's image reference (a URL or a Label Studio path), so no presigned token or password in a
URL lands on disk; the stored reasons are the download errors' own messages, which already name the image
with its query values redacted (and are redacted once more here).  Writers in several processes (RQ workers)
are safe: every change is a read-modify-write under an exclusive ``flock`` on a lock file beside it, and the
file is replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isal_backend.logs import redact_text

if TYPE_CHECKING:
    from isal_backend.settings import Settings

DEFAULT_RETRY_SECONDS = 3600.0
FILE_NAME = "failed-images.json"
# Far more than any project's broken images; past it the oldest entries go first (the file stays small).
MAX_ENTRIES = 50_000


@dataclass(frozen=True)
class Failure:
    """One remembered failure: the error message and when it happened (Unix time)."""

    reason: str
    at: float

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.at)


class FailedDownloads:
    """Per-URL memory of failed downloads, valid for `retry_seconds` (after that the URL is tried again)."""

    def __init__(self, path: Path | str, retry_seconds: float = DEFAULT_RETRY_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        """`clock` is the wall clock (injectable so tests can move past the TTL without sleeping)."""
        if retry_seconds < 0:
            raise ValueError(f"retry_seconds must be >= 0, got {retry_seconds!r}")
        self.path = Path(path)
        self.retry_seconds = float(retry_seconds)
        self._clock = clock

    @classmethod
    def for_project(cls, settings: Settings, project_id: int) -> FailedDownloads | None:
        """The project's memory at MODEL_DIR/projects/<id>/failed-images.json with ISAL_FAILED_IMAGE_RETRY_SECONDS
        as its TTL; None when that setting is 0 (no memory: every round tries every image)."""
        seconds = float(settings.failed_image_retry_seconds)
        if seconds <= 0:
            return None
        return cls(Path(settings.model_dir) / "projects" / str(int(project_id)) / FILE_NAME, seconds)

    def __repr__(self) -> str:
        return f"FailedDownloads({str(self.path)!r}, retry_seconds={self.retry_seconds:g})"

    def now(self) -> float:
        """The clock the TTL is measured with."""
        return self._clock()

    @staticmethod
    def key(url: str) -> str:
        """The on-disk key of `url`: its SHA-256, so the file holds no URL (and no token in one)."""
        return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, url: str) -> Failure | None:
        """The failure remembered for `url` if it is younger than the TTL, else None."""
        entry = self._read().get(self.key(url))
        if not isinstance(entry, dict):
            return None
        try:
            failure = Failure(str(entry["reason"]), float(entry["at"]))
        except (KeyError, TypeError, ValueError):
            return None
        return failure if failure.age(self._clock()) < self.retry_seconds else None

    def record(self, url: str, reason: str) -> None:
        """Remember that `url` failed now, with `reason` (redacted of URL query values and userinfo)."""
        now = self._clock()
        with self._locked():
            entries = self._read()
            entries[self.key(url)] = {"reason": redact_text(reason)[:500], "at": now}
            self._write(self._pruned(entries, now))

    def __len__(self) -> int:
        """How many URLs are remembered now (within the TTL)."""
        return len(self._fresh(self._read(), self._clock()))

    # ------------------------------------------------------------------------------------ file plumbing

    def _fresh(self, entries: dict[str, Any], now: float) -> dict[str, Any]:
        return {k: v for k, v in entries.items()
                if isinstance(v, dict) and isinstance(v.get("at"), int | float) and now - v["at"] < self.retry_seconds}

    def _pruned(self, entries: dict[str, Any], now: float) -> dict[str, Any]:
        fresh = self._fresh(entries, now)
        if len(fresh) > MAX_ENTRIES:
            newest = sorted(fresh.items(), key=lambda kv: kv[1]["at"])[-MAX_ENTRIES:]
            fresh = dict(newest)
        return fresh

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):  # a damaged file is a lost memory, never a failed round
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, entries: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{FILE_NAME}-")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(entries, out, separators=(",", ":"))
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{FILE_NAME}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


__all__ = ["DEFAULT_RETRY_SECONDS", "FILE_NAME", "FailedDownloads", "Failure"]
