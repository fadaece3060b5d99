"""A durable, append-only journal of webhook events that could not be queued (Redis unavailable).

Label Studio sends each webhook once, with a 1 s timeout, and never again: an event that reaches
``/webhook`` while Redis is down must be kept until it can be queued, or its annotation reaches no round.
The webhook appends the event here (one JSON line, fsynced before the 2xx answer) and a replayer
(:class:`JournalReplayer` in the web process, and the RQ worker's sweeper) submits the lines to the
queue once Redis answers again.

Files under ``MODEL_DIR/journal/``, shared by every process on the host (and hosts sharing MODEL_DIR):

* ``events.jsonl``: appended by webhooks, under an ``flock`` on ``.lock`` (one write per event).
* ``draining-<id>.jsonl``: a batch a replayer took (renamed from ``events.jsonl`` under the lock, so
  writers start a new file). It is deleted once every line was submitted; a line that cannot be
  submitted goes back to ``events.jsonl``. A batch left by a replayer that died (older than
  :data:`STALE_DRAIN_S`) is taken over by the next one (a rename: only one replayer wins it).

Delivery is at least once: a replayer killed after submitting some lines re-submits them, which the
coalescing queue absorbs (an extra event makes at most one extra round, never a lost one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isal_backend.queue.base import KINDS

logger = logging.getLogger(__name__)

EVENTS = "events.jsonl"
STALE_DRAIN_S = 120.0
MAX_LINE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class JournaledEvent:
    """One event to submit: ``kind`` for ``project_id`` (with the task ids of a scoring event)."""

    kind: str
    project_id: int
    task_ids: tuple[int, ...] = ()
    action: str = ""
    at: float = 0.0


class Journal:
    """The journal folder; every method is safe across threads and processes."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def for_model_dir(cls, model_dir: str | Path) -> Journal:
        return cls(Path(model_dir) / "journal")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _append_lines(self, lines: list[str]) -> None:
        """Append and fsync (the file, and the folder when the file is new) under the lock."""
        path = self.folder / EVENTS
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            data = "".join(line + "\n" for line in lines).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def append(self, event: JournaledEvent) -> None:
        """Keep ``event`` durably (on disk, fsynced) before the webhook answers."""
        line = json.dumps({"v": 1, "id": uuid.uuid4().hex, "kind": event.kind, "project": int(event.project_id),
                           "task_ids": [int(t) for t in event.task_ids], "action": event.action,
                           "at": event.at or time.time()}, separators=(",", ":"))
        with self._locked():
            self._append_lines([line])

    def pending(self) -> int:
        """Events not yet submitted (lines in the journal and in batches being drained)."""
        count = 0
        for path in self._files():
            with contextlib.suppress(OSError), path.open("rb") as fh:
                count += sum(1 for line in fh if line.strip())
        return count

    def has_pending(self) -> bool:
        """Cheap: whether any journal file exists (no reading)."""
        return bool(self._files())

    def _files(self) -> list[Path]:
        if not self.folder.exists():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name == EVENTS or p.name.startswith("draining-"))

    def _take(self) -> list[Path]:
        """Batches this caller now owns: the current events file, and stale batches of dead replayers."""
        taken: list[Path] = []
        with self._locked():
            current = self.folder / EVENTS
            if current.exists():
                batch = self.folder / f"draining-{time.time():.6f}-{uuid.uuid4().hex[:8]}.jsonl"
                os.rename(current, batch)
                taken.append(batch)
        now = time.time()
        for path in self._files():
            if not path.name.startswith("draining-") or path in taken:
                continue
            try:
                if now - path.stat().st_mtime < STALE_DRAIN_S:
                    continue
                mine = self.folder / f"draining-{now:.6f}-{uuid.uuid4().hex[:8]}.jsonl"
                os.rename(path, mine)  # only one replayer wins the rename
            except FileNotFoundError:
                continue
            logger.warning("journal: taking over batch %s left by a replayer that stopped", path.name)
            taken.append(mine)
        return taken

    def drain(self, submit: Callable[[JournaledEvent], Any]) -> int:
        """Submit every journaled event with ``submit``; return how many were submitted.

        Stops at the first failing submit (Redis still down): that line and the rest of its batch go back to
        the journal, and the error is raised.
        """
        submitted = 0
        for batch in self._take():
            lines = [line for line in batch.read_text(errors="replace").splitlines() if line.strip()]
            for i, line in enumerate(lines):
                event = _parse(line, batch.name)
                if event is None:
                    continue
                try:
                    submit(event)
                except BaseException:
                    with self._locked():
                        self._append_lines(lines[i:])
                    batch.unlink(missing_ok=True)
                    raise
                submitted += 1
            batch.unlink(missing_ok=True)
        return submitted


def _parse(line: str, where: str) -> JournaledEvent | None:
    """A journal line, or None (logged) for a torn or foreign line, which is dropped."""
    try:
        if len(line) > MAX_LINE_BYTES:
            raise ValueError("line too long")
        raw = json.loads(line)
        kind, project = raw["kind"], raw["project"]
        if kind not in KINDS or not isinstance(project, int) or isinstance(project, bool) or project < 1:
            raise ValueError(f"bad kind or project {kind!r}/{project!r}")
        task_ids = tuple(int(t) for t in raw.get("task_ids") or ())
        return JournaledEvent(kind, project, task_ids, str(raw.get("action") or ""), float(raw.get("at") or 0))
    except (ValueError, KeyError, TypeError) as exc:
        logger.error("journal %s: dropping an unreadable line (%s): %.200s", where, exc, line)
        return None


class JournalReplayer:
    """A daemon thread of the web process: drains the journal into the queue whenever it has events.

    Started lazily (on the first request), so it runs in each gunicorn worker rather than only in the
    master. ``submit`` raises while Redis is down; the thread then waits ``retry_s`` and tries again.
    """

    def __init__(self, journal: Journal, submit: Callable[[JournaledEvent], Any], period_s: float = 1.0,
                 on_drained: Callable[[int], None] | None = None, on_failed: Callable[[BaseException], None] | None
                 = None) -> None:
        self.journal, self.submit, self.period_s = journal, submit, period_s
        self.on_drained, self.on_failed = on_drained, on_failed
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()

    def ensure_started(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, daemon=True, name="isal-journal-replayer")
                self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def replay_once(self) -> int:
        """Drain now (if anything is journaled); return how many events were submitted."""
        if not self.journal.has_pending():
            return 0
        try:
            n = self.journal.drain(self.submit)
        except Exception as exc:  # noqa: BLE001 - Redis still down: kept, retried on the next tick
            if self.on_failed is not None:
                self.on_failed(exc)
            logger.warning("journal: events stay journaled, the queue is still unavailable: %r", exc)
            return 0
        if n:
            logger.warning("journal: %d event(s) kept while the queue was unavailable are now queued", n)
        if self.on_drained is not None:
            self.on_drained(n)
        return n

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.replay_once()
            except Exception:  # noqa: BLE001 - the replayer must outlive any surprise
                logger.exception("journal replayer: unexpected error")
            self._wake.wait(self.period_s)
            self._wake.clear()
