"""Per-project model store in ``MODEL_DIR``: versioned rounds, written atomically.

Layout::

    MODEL_DIR/projects/<id>/
        credentials.json               /setup's hostname and token (0600, see settings.py)
        rounds/<round_id>/state.pt     the round's tensors (heads, s_test, a detector's weights, ...)
        rounds/<round_id>/meta.json    what the tensors are (task kind, labels, architecture; keys in
                                       isal_backend/tasks/artifacts.py)
        rounds/<round_id>/report.json  metrics, counts, timings, order in force, skipped items
        CURRENT                        the round id in force (replaced atomically)
        history.jsonl                  one summary line per committed round, never pruned (see history.py)
        thumbnails/<hash>.jpg          the stream head's images, small, for the dashboard (see thumbnails.py)
        features/<backbone>/*.pt       feature cache chunks (see FeatureCache)
        images/<hash>                  downloaded image bytes of detection tasks (see ImageCache)
        detector-body/*.pt             the detector's frozen body outputs, float16 (see TensorListCache)

A round is written into a hidden staging folder and renamed into ``rounds/`` only when complete,
then ``CURRENT`` is swapped with ``os.replace``: a job killed at any point leaves the previous
round current and at worst an orphaned staging folder, which :meth:`ModelStore.sweep_staging` removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from isal_backend.history import append, history_path, stored_rounds, summary


@dataclass
class RoundState:
    """A stored round: its tensors, the metadata that says what they are, and its JSON report."""

    round_id: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    report: dict[str, Any]


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ModelStore:
    """Rounds of one ``MODEL_DIR``; safe to share between processes and machines on one filesystem."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def project_dir(self, project_id: int) -> Path:
        return self.root / "projects" / str(int(project_id))

    def current_id(self, project_id: int) -> str | None:
        try:
            return (self.project_dir(project_id) / "CURRENT").read_text().strip() or None
        except FileNotFoundError:
            return None

    def load(self, project_id: int, round_id: str | None = None) -> RoundState | None:
        """The named round, or the current one; None when the project has none yet."""
        round_id = round_id or self.current_id(project_id)
        if round_id is None:
            return None
        folder = self.project_dir(project_id) / "rounds" / round_id
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        meta_path = folder / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        report = json.loads((folder / "report.json").read_text())
        return RoundState(round_id, state, meta, report)

    def rounds(self, project_id: int) -> list[str]:
        folder = self.project_dir(project_id) / "rounds"
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []

    def commit(
        self,
        project_id: int,
        round_id: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        report: dict[str, Any],
    ) -> Path:
        """Write a complete round and make it current; never leaves a half-written round current."""
        rounds = self.project_dir(project_id) / "rounds"
        rounds.mkdir(parents=True, exist_ok=True)
        staging = rounds / f".staging-{round_id}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            torch.save(tensors, staging / "state.pt")
            (staging / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            (staging / "report.json").write_text(json.dumps(report, indent=2, default=str))
            final = rounds / round_id
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _atomic_write_text(self.project_dir(project_id) / "CURRENT", round_id + "\n")
        return final

    def sweep_staging(self, project_id: int) -> int:
        """Remove staging folders left by killed jobs; returns how many."""
        rounds = self.project_dir(project_id) / "rounds"
        stale = list(rounds.glob(".staging-*")) if rounds.exists() else []
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        return len(stale)

    def record_history(self, project_id: int, report: dict[str, Any]) -> None:
        """Append the committed round's summary to the project's history (the dashboard's curve and timeline).

        A project's first history line is preceded by the rounds it still has stored, oldest first.
        """
        folder = self.project_dir(project_id)
        seed = None
        if not history_path(folder).exists():
            seed = [r for r in stored_rounds(folder) if r.get("round_id") != report.get("round_id")]
        append(folder, summary(report), seed=seed)

    def prune(self, project_id: int, keep: int = 5) -> None:
        """Keep the newest ``keep`` rounds (and always the current one)."""
        current = self.current_id(project_id)
        for name in self.rounds(project_id)[:-keep]:
            if name != current:
                shutil.rmtree(self.project_dir(project_id) / "rounds" / name, ignore_errors=True)


class FeatureCache:
    """Backbone features per image reference, as append-only chunk files, memory-mapped.

    Each writer adds a new chunk (atomically renamed), so concurrent workers never corrupt each other;
    readers map every chunk once and remember which they have seen, so a long-lived process (the
    embedded worker, an RQ worker) pays only for chunks written since its last round. One instance per
    folder and process (:meth:`shared`): a project of 100,000 images is indexed once, not every round.
    """

    _shared: dict[Path, FeatureCache] = {}
    _shared_lock = threading.Lock()

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._seen: set[str] = set()
        self._chunks: list[torch.Tensor] = []
        self._index: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, folder: str | Path) -> FeatureCache:
        """This process's cache of ``folder``."""
        key = Path(folder).resolve()
        with cls._shared_lock:
            cache = cls._shared.get(key)
            if cache is None:
                cache = cls._shared[key] = cls(key)
            return cache

    def _refresh(self) -> None:
        if not self.folder.exists():
            return
        for path in sorted(self.folder.glob("chunk-*.pt")):
            if path.name in self._seen:
                continue
            try:
                chunk = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError:  # removed by its owner meanwhile (a dropped fine-tuned version)
                continue
            keys = chunk["keys"].split("\n") if isinstance(chunk["keys"], str) else list(chunk["keys"])
            self._add(keys, chunk["features"])
            self._seen.add(path.name)

    def _add(self, keys: list[str], features: torch.Tensor) -> None:
        number = len(self._chunks)
        self._chunks.append(features)
        for row, key in enumerate(keys):
            self._index[key] = (number, row)

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._index)

    def contains(self, keys: list[str]) -> list[bool]:
        with self._lock:
            self._refresh()
            return [k in self._index for k in keys]

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        with self._lock:
            self._refresh()
            where = {k: self._index[k] for k in keys if k in self._index}
        return {k: self._chunks[c][r] for k, (c, r) in where.items()}

    def matrix(self, keys: list[str], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of ``keys`` as one float32 matrix (zeros where missing) and the mask of found ones.

        Gathered per chunk with one index_select each: for 100,000 rows this is a copy, not 100,000 tensors.
        """
        with self._lock:
            self._refresh()
            where = [self._index.get(k) for k in keys]
        out = torch.zeros(len(keys), dim)
        found = torch.tensor([w is not None for w in where], dtype=torch.bool)
        by_chunk: dict[int, tuple[list[int], list[int]]] = {}
        for position, w in enumerate(where):
            if w is not None:
                positions, rows = by_chunk.setdefault(w[0], ([], []))
                positions.append(position)
                rows.append(w[1])
        for chunk, (positions, rows) in by_chunk.items():
            out[torch.tensor(positions)] = self._chunks[chunk].index_select(0, torch.tensor(rows)).float()
        return out, found

    def put_many(self, keys: list[str], features: torch.Tensor) -> None:
        if not keys:
            return
        if any("\n" in k for k in keys):
            raise ValueError("feature cache keys must not contain a line break")
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"chunk-{uuid.uuid4().hex}.pt"
        rows = features.float().contiguous()
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            torch.save({"keys": "\n".join(keys), "features": rows}, fh)  # one string: fast to load
        os.replace(tmp, self.folder / name)
        with self._lock:
            self._add(list(keys), rows)
            self._seen.add(name)


class ImageCache:
    """The bytes of each downloaded image, one file per reference, written atomically.

    Detection rounds decode every task image each round (the detector's training reads pixels, not
    cached features); keeping the bytes spares a download per image per round. Keyed like
    :class:`FeatureCache`, by the image reference: Label Studio's upload and storage URLs name
    immutable files. File names are a hash of the reference, so no URL (or token in one) lands on disk.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, reference: str) -> Path:
        return self.folder / hashlib.blake2b(reference.encode(), digest_size=20).hexdigest()

    def has(self, reference: str) -> bool:
        """Whether the bytes are kept (without reading them)."""
        return self._path(reference).is_file()

    def get(self, reference: str) -> bytes | None:
        try:
            return self._path(reference).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, reference: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, self._path(reference))


class TensorListCache(MutableMapping[bytes, list[torch.Tensor]]):
    """A ``key -> list of tensors`` mapping kept on disk in float16 chunk files, within a size budget.

    The detector's frozen backbone body costs about 30 ms per image on 2 CPU cores and its output
    never changes for the same input, so a round hands this mapping to the detector as its body cache
    and :meth:`flush` keeps what it computed for the next round. Chunks are append-only and written
    atomically, as in :class:`FeatureCache`; the oldest are deleted past ``max_bytes`` (their
    entries are simply computed again). Values come back as float32.
    """

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._entries: dict[bytes, list[torch.Tensor]] = {}
        self._new: list[bytes] = []
        self.loaded = 0
        if self.folder.exists():
            for path in sorted(self.folder.glob("chunk-*.pt"), key=lambda p: p.name):
                try:
                    # Memory-mapped: a project's whole cache can be larger than the worker's RAM;
                    # only the entries a round touches are paged in.
                    chunk = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except FileNotFoundError:  # deleted by another process's budget check meanwhile
                    continue
                for key, value in zip(chunk["keys"], chunk["values"], strict=True):
                    self._entries[bytes(key)] = value
                    self.loaded += 1

    def __getitem__(self, key: bytes) -> list[torch.Tensor]:
        return [t.float() for t in self._entries[key]]

    def __setitem__(self, key: bytes, value: list[torch.Tensor]) -> None:
        if key not in self._entries:
            self._new.append(key)
        self._entries[key] = [t.detach().to(torch.float16).contiguous() for t in value]

    def __delitem__(self, key: bytes) -> None:
        del self._entries[key]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pending(self) -> int:
        """Entries computed since the last flush (what the next :meth:`flush` writes)."""
        return sum(1 for k in self._new if k in self._entries)

    def flush(self) -> int:
        """Write the entries added since the last flush as one chunk, then enforce the budget; returns how many."""
        fresh = [k for k in self._new if k in self._entries]
        self._new = []
        if fresh and self.max_bytes > 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Chunk names sort by time, so the budget check removes the oldest first.
            name = f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.pt"
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                torch.save({"keys": [list(k) for k in fresh], "values": [self._entries[k] for k in fresh]}, fh)
            os.replace(tmp, self.folder / name)
        self._enforce_budget()
        return len(fresh) if self.max_bytes > 0 else 0

    def _enforce_budget(self) -> None:
        if not self.folder.exists():
            return
        chunks = sorted(self.folder.glob("chunk-*.pt"), key=lambda p: p.name, reverse=True)
        total = 0
        for path in chunks:
            try:
                total += path.stat().st_size
                if total > self.max_bytes:
                    path.unlink()
            except FileNotFoundError:
                continue
