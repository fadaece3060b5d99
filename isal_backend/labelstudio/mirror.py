"""A mirror of one project's tasks and labels, so a round reads from Label Studio only what changed.

Every round used to fetch every task and every annotation of its project: at 10,000 tasks that was 6 of
its 9 seconds, growing with the pool while the change (one annotation) does not. The mirror keeps what a
round needs of each task (id, data, annotations) in SQLite under the project's model-store folder:
shared by every worker on the machine, kept across restarts, written in transactions. Each process also
keeps an in-memory copy and refreshes it by a sequence number, so a long-lived worker reads only the
rows written since its last round.

:func:`sync` brings it up to date (see its docstring for the rules); the annotations are normalised to
the fields the backend reads, so a mirror kept up to date by incremental syncs and one made by a full
resync hold the same tasks.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any, Protocol

from isal_backend.labelstudio.convert import NEVER, ls_moment

log = logging.getLogger(__name__)

#: What a round reads of an annotation (everything else Label Studio sends is dropped).
ANNOTATION_FIELDS = ("id", "result", "was_cancelled", "created_at", "updated_at")
#: Changes are read from this long before the newest one seen: a transaction that committed late with an
#: earlier ``updated_at`` is still caught (re-reading a task is harmless).
CURSOR_LAG = timedelta(seconds=5)
#: How far back a sync re-reads every changed task when the annotation count disagrees (see :func:`sync`).
RECHECK_WINDOW = timedelta(minutes=10)
#: Label Studio's Data Manager datetime format (it refuses others).
LS_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
RESYNC_MARKER = "mirror.resync"


def normalize(task: Mapping[str, Any], annotations: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """A task as the mirror keeps it: id, data, and its annotations (sorted by id) with the fields a round reads."""
    raw = task.get("annotations") if annotations is None else annotations
    kept = [{k: a.get(k) for k in ANNOTATION_FIELDS} | {"task": int(task["id"])}
            for a in raw or [] if isinstance(a, Mapping)]
    kept.sort(key=lambda a: (a["id"] if isinstance(a["id"], int) else -1))
    data = task.get("data")
    return {"id": int(task["id"]), "data": dict(data) if isinstance(data, Mapping) else {}, "annotations": kept}


class TaskMirror:
    """One project's mirrored tasks: SQLite on disk, a per-process copy refreshed by sequence number."""

    _shared: dict[Path, TaskMirror] = {}
    _shared_lock = threading.Lock()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._seq = 0
        self._tasks: dict[int, dict[str, Any]] = {}
        self._sorted: list[dict[str, Any]] | None = None
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY, body TEXT, seq INTEGER NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS tasks_seq ON tasks (seq)")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")

    @classmethod
    def shared(cls, path: str | Path) -> TaskMirror:
        """This process's mirror at ``path`` (one per file and process)."""
        key = Path(path).resolve()
        with cls._shared_lock:
            mirror = cls._shared.get(key)
            if mirror is None:
                mirror = cls._shared[key] = cls(key)
            return mirror

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 60000")
        return db

    # -- reading ------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the rows other processes (or earlier rounds) wrote since this copy's last look."""
        with self._lock:
            db = self._connect()
            try:
                rows = db.execute("SELECT id, body, seq FROM tasks WHERE seq > ? ORDER BY seq", (self._seq,)).fetchall()
            finally:
                db.close()
            for task_id, body, seq in rows:
                if body is None:
                    self._tasks.pop(task_id, None)
                else:
                    self._tasks[task_id] = json.loads(body)
                self._seq = max(self._seq, seq)
            if rows:
                self._sorted = None

    def tasks(self) -> list[dict[str, Any]]:
        """Every mirrored task by id (shared objects: callers must not change them)."""
        with self._lock:
            self.refresh()
            if self._sorted is None:
                self._sorted = [self._tasks[k] for k in sorted(self._tasks)]
            return self._sorted

    def get(self, task_id: int) -> dict[str, Any] | None:
        with self._lock:
            return self._tasks.get(int(task_id))

    def annotation_count(self) -> int:
        """Annotations mirrored, cancelled ones included (what Label Studio's project counts add up to)."""
        return sum(len(t.get("annotations") or []) for t in self.tasks())

    def ids(self) -> set[int]:
        with self._lock:
            self.refresh()
            return set(self._tasks)

    def __len__(self) -> int:
        with self._lock:
            self.refresh()
            return len(self._tasks)

    def meta(self, key: str) -> str | None:
        db = self._connect()
        try:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        finally:
            db.close()
        return row[0] if row else None

    # -- writing -------------------------------------------------------------------------------------------
    def apply(self, upserts: Sequence[Mapping[str, Any]], deletes: Iterable[int] = (), *, replace_all: bool = False,
              meta: Mapping[str, str] | None = None) -> None:
        """Write normalised tasks and deletions (``replace_all``: delete every task not in ``upserts``) at once."""
        with self._lock:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                seq = (db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0] or 0) + 1
                gone = set(int(i) for i in deletes)
                if replace_all:
                    keep = {int(t["id"]) for t in upserts}
                    gone |= {row[0] for row in db.execute("SELECT id FROM tasks WHERE body IS NOT NULL")} - keep
                db.executemany("INSERT OR REPLACE INTO tasks (id, body, seq) VALUES (?, ?, ?)",
                               [(int(t["id"]), json.dumps(t, separators=(",", ":")), seq) for t in upserts])
                db.executemany("INSERT OR REPLACE INTO tasks (id, body, seq) VALUES (?, NULL, ?)",
                               [(i, seq) for i in gone])
                db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list((meta or {}).items()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                db.close()
        self.refresh()


class MirrorSource(Protocol):
    """What :func:`sync` asks Label Studio (:class:`~isal_backend.labelstudio.client.LabelStudioClient` has it)."""

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]: ...

    def newest_task_update(self, project_id: int) -> str | None: ...

    def tasks_updated_since(self, project_id: int, since: str) -> list[dict[str, Any]]: ...

    def tasks_with_annotations(self, project_id: int, task_ids: Sequence[int]) -> list[dict[str, Any]]: ...

    def task_ids(self, project_id: int) -> list[int]: ...


def _minus_lag(stamp: str) -> str:
    """``stamp`` less CURSOR_LAG, in the format the Data Manager takes (LS may send it without a fraction)."""
    moment = ls_moment(stamp)
    if moment == NEVER:
        raise ValueError(f"unreadable Label Studio timestamp {stamp!r}")
    return (moment.astimezone(UTC) - CURSOR_LAG).strftime(LS_TIME)


def request_resync(project_dir: Path) -> None:
    """Ask the project's next round for a full resync (the "Start training" button does)."""
    project_dir.mkdir(parents=True, exist_ok=True)
    (project_dir / RESYNC_MARKER).touch()


def sync(source: MirrorSource, mirror: TaskMirror, project_id: int, task_number: int | None,
         resync_seconds: float, annotation_number: int | None = None) -> dict[str, Any]:
    """Bring ``mirror`` up to date with Label Studio; returns what it did (for the round's report).

    * a full resync (every task, every annotation) when the mirror is empty, when the last one is older
      than ``resync_seconds`` (0: every time), or when one was requested (:func:`request_resync`);
    * otherwise the tasks whose ``updated_at`` moved since the newest change seen (Label Studio bumps it
      on every annotation saved, updated, skipped or deleted, and on import), with the annotations of
      those that have or had any (by the row's counters, or because the mirror knew the task already);
      then two checks against the project's counts, read before the sync:
    * ``task_number``: on a mismatch (deleted tasks, or tasks a change query missed) the id list is
      compared and the difference applied;
    * ``annotation_number`` (the project's annotations, cancelled included, counted on Label Studio's
      annotation table): a task's counters can still read 0 after its ``updated_at`` moved (seen on 1.23.2:
      a round read a just-labeled task with ``total_annotations: 0``, so its label was never mirrored and
      the cursor moved past it). When the mirror holds fewer (more is normal: annotations saved between
      the count and the sync), every task changed within :data:`RECHECK_WINDOW` is read again with its
      annotations, counters ignored; should it still hold fewer, a full resync.
    """
    started = time.perf_counter()
    marker = mirror.path.parent / RESYNC_MARKER
    last_full = float(mirror.meta("full_synced_at") or 0.0)
    cursor = mirror.meta("cursor")
    requested = marker.exists()
    due = resync_seconds <= 0 or time.time() - last_full > resync_seconds
    if not cursor or requested or due:
        reason = "requested" if requested else "first (or empty project)" if not cursor else "scheduled"
        return _full(source, mirror, project_id, marker, started, reason)
    rows = source.tasks_updated_since(project_id, _minus_lag(cursor))
    known = mirror.ids()
    need = [int(r["id"]) for r in rows if int(r["id"]) in known
            or int(r.get("total_annotations") or 0) + int(r.get("cancelled_annotations") or 0) > 0]
    _upsert(source, mirror, project_id, rows, need, cursor)
    report: dict[str, Any] = {"mode": "incremental", "changed": len(rows), "with_annotations": len(need)}
    if task_number is not None and len(mirror) != task_number:
        present = set(source.task_ids(project_id))
        known = mirror.ids()
        missing = sorted(present - known)
        fetched = source.tasks_with_annotations(project_id, missing) if missing else []
        mirror.apply([normalize(t) for t in fetched], deletes=known - present)
        report.update({"count_check": "mismatch", "deleted": len(known - present), "added": len(fetched)})
    mirrored = mirror.annotation_count()
    if annotation_number is not None and mirrored < annotation_number:
        since = (ls_moment(cursor).astimezone(UTC) - RECHECK_WINDOW).strftime(LS_TIME)
        window = source.tasks_updated_since(project_id, since)
        _upsert(source, mirror, project_id, window, [int(r["id"]) for r in window], cursor)
        check = {"label_studio": annotation_number, "mirror": mirrored, "rechecked": len(window)}
        mirrored = check["after"] = mirror.annotation_count()
        report["annotation_check"] = check
        if mirrored < annotation_number:
            full = _full(source, mirror, project_id, marker, started, "annotation count still disagrees")
            return {**full, "annotation_check": check}
    report["annotations"] = mirrored
    report["seconds"] = round(time.perf_counter() - started, 4)
    return report


def _upsert(source: MirrorSource, mirror: TaskMirror, project_id: int, rows: list[dict[str, Any]],
            need: list[int], cursor: str) -> None:
    """Mirror ``rows`` (changed tasks), with the annotations of the ``need`` ones read; move the cursor on."""
    detailed = {int(t["id"]): t for t in source.tasks_with_annotations(project_id, need)} if need else {}
    upserts = [normalize(r, (detailed.get(int(r["id"])) or {}).get("annotations") or []) for r in rows]
    newest = max([cursor, *(str(r["updated_at"]) for r in rows if r.get("updated_at"))], key=ls_moment)
    mirror.apply(upserts, meta={"cursor": newest})


def _full(source: MirrorSource, mirror: TaskMirror, project_id: int, marker: Path, started: float,
          reason: str) -> dict[str, Any]:
    newest = source.newest_task_update(project_id)  # before the listing: later changes are re-read next time
    tasks = [normalize(t) for t in source.list_tasks(project_id)]
    mirror.apply(tasks, replace_all=True, meta={"cursor": newest or "", "full_synced_at": str(time.time())})
    marker.unlink(missing_ok=True)
    return {"mode": "full", "reason": reason, "tasks": len(tasks), "annotations": mirror.annotation_count(),
            "seconds": round(time.perf_counter() - started, 4)}
