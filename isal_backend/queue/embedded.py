"""In-process implementation of the coalescing queue (no REDIS_URL): a few background threads.

Same semantics as :mod:`isal_backend.queue.redis_queue`: per project and kind at most one job waits
(new events are absorbed by it), a job that runs never blocks new events from creating the next
waiting job, crashes are retried with backoff then reported. ``threads`` threads (``ISAL_EMBEDDED_THREADS``)
take jobs, never two of one project at a time, so a project whose round is slow (images that drip in
until their download deadline) does not hold back another project's round. State is per process: run
gunicorn with ``--workers 1`` (threads are fine) in this mode, as the Makefile does.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isal_backend.pacing import KEEP_EVENTS
from isal_backend.priority import lower_priority
from isal_backend.queue.base import KINDS, ROUND, SCORE, Outcome, Submission, failure_message, is_retryable, resolve
from isal_backend.queue.context import JobContext, reset_current_job, set_current_job
from isal_backend.settings import Settings
from isal_backend.status import StatusStore, record_job_outcome

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    kind: str
    project_id: int
    job_id: str
    not_before: float = 0.0
    attempt: int = 0


@dataclass
class _Project:
    pending: dict[str, str] = field(default_factory=dict)  # kind -> waiting job id
    running: str | None = None
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    task_ids: set[int] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)
    activity: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP_EVENTS))  # monotonic times


class EmbeddedCoalescer:
    """Submits events and runs jobs on one daemon thread (started lazily, so it survives gunicorn's fork)."""

    def __init__(
        self,
        *,
        targets: dict[str, str],
        status_folder: Path,
        retries: int = 3,
        backoff: tuple[int, ...] = (10, 60, 300),
        reconcile: Settings | None = None,
        threads: int = 2,
        nice: int = 0,
    ) -> None:
        """``reconcile``: the settings to reconcile projects with (a thread checks them every
        ``reconcile_seconds``; see :mod:`isal_backend.queue.reconcile`), or None for no reconciliation.
        ``nice``: added to the worker threads' niceness (the web server's threads keep theirs)."""
        self.targets = targets
        self.store = StatusStore(redis=None, prefix="", folder=status_folder)
        self.retries, self.backoff = retries, tuple(backoff) or (0,)
        self._lock = threading.Condition()
        self._items: list[_Item] = []
        self._projects: dict[int, _Project] = {}
        self.threads = max(1, int(threads))
        self.nice = int(nice)
        self._workers: list[threading.Thread] = []
        self._reconcile_settings = reconcile if reconcile is not None and reconcile.reconcile_seconds > 0 else None
        self._reconcile_thread: threading.Thread | None = None
        self._closed = False
        self._taken: set[int] = set()  # projects whose job a thread took off the list and has not finished
        self.jobs = dict.fromkeys((Outcome.SUCCEEDED, Outcome.FAILED, Outcome.RETRYING, Outcome.SUPERSEDED), 0)

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedCoalescer:
        return cls(
            targets={ROUND: settings.round_job, SCORE: settings.score_job},
            status_folder=Path(settings.model_dir) / "status",
            retries=settings.job_retries,
            backoff=settings.retry_backoff,
            reconcile=settings,
            threads=settings.embedded_threads,
            nice=settings.worker_nice,
        )

    def submit(self, kind: str, project_id: int, task_ids: list[int] | None = None) -> Submission:
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        pid = int(project_id)
        with self._lock:
            self._ensure_thread()
            proj = self._projects.setdefault(pid, _Project())
            proj.events[kind] += 1
            proj.task_ids.update(int(t) for t in task_ids or [])
            waiting = proj.pending.get(kind)
            if waiting is not None:
                proj.counters[f"absorbed_{kind}"] = proj.counters.get(f"absorbed_{kind}", 0) + 1
                return Submission(kind, pid, waiting, "absorbed", proj.events[kind])
            job_id = f"{kind}-{pid}-{uuid.uuid4().hex}"
            proj.pending[kind] = job_id
            self._items.append(_Item(kind, pid, job_id))
            self._lock.notify_all()
            return Submission(kind, pid, job_id, "enqueued", proj.events[kind])

    def note_activity(self, project_id: int) -> None:
        """An annotator just submitted, updated or deleted an annotation: rounds pace their calls around it."""
        with self._lock:
            self._projects.setdefault(int(project_id), _Project()).activity.appendleft(time.monotonic())

    def activity(self, project_id: int) -> list[float]:
        """Seconds since each of the project's recent annotator events, newest first (see isal_backend.pacing)."""
        now = time.monotonic()
        with self._lock:
            proj = self._projects.get(int(project_id))
            return [now - t for t in proj.activity] if proj is not None else []

    def ensure_started(self) -> None:
        """Start the worker and reconciliation threads if they are not running (e.g. after a fork)."""
        with self._lock:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._closed:
            return
        self._workers = [t for t in self._workers if t.is_alive()]
        while len(self._workers) < self.threads:
            thread = threading.Thread(target=self._loop, daemon=True,
                                      name=f"isal-embedded-worker-{len(self._workers) + 1}")
            thread.start()
            self._workers.append(thread)
        if self._reconcile_settings is not None and (
                self._reconcile_thread is None or not self._reconcile_thread.is_alive()):
            self._reconcile_thread = threading.Thread(target=self._reconcile_loop, daemon=True,
                                                      name="isal-embedded-reconcile")
            self._reconcile_thread.start()

    def _busy(self, project_id: int) -> bool:
        with self._lock:
            proj = self._projects.get(project_id)
            return proj is not None and (proj.running is not None or ROUND in proj.pending)

    def _reconcile_loop(self) -> None:
        from isal_backend.queue.reconcile import Reconciler

        settings = self._reconcile_settings
        assert settings is not None
        reconciler = Reconciler(settings, submit=lambda pid: self.submit(ROUND, pid), busy=self._busy)
        wait = min(settings.reconcile_seconds, 10.0)
        while True:
            with self._lock:
                if self._lock.wait_for(lambda: self._closed, timeout=wait):
                    return
            wait = settings.reconcile_seconds
            try:
                reconciler.run_once()
            except Exception:  # noqa: BLE001 - reconciliation must outlive any surprise
                logger.exception("embedded reconciliation failed")

    def _next_item(self) -> _Item | None:
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                ready = [i for i in self._items if i.not_before <= now and i.project_id not in self._taken]
                if ready:
                    self._items.remove(ready[0])
                    self._taken.add(ready[0].project_id)
                    return ready[0]
                later = [i.not_before - now for i in self._items if i.not_before > now]
                self._lock.wait(timeout=min(later, default=None))  # a finished job notifies too
            return None

    def _loop(self) -> None:
        lower_priority(self.nice)
        while (item := self._next_item()) is not None:
            try:
                self._run(item)
            except Exception:  # noqa: BLE001 - the loop must survive anything a job does
                logger.exception("embedded worker: unexpected error around job %s", item.job_id)
            finally:
                with self._lock:
                    self._taken.discard(item.project_id)
                    self._lock.notify_all()  # the project's next job may run now

    def _run(self, item: _Item) -> None:
        with self._lock:
            proj = self._projects[item.project_id]
            waiting = proj.pending.get(item.kind)
            if waiting is not None and waiting != item.job_id:
                self.jobs[Outcome.SUPERSEDED] += 1
                return
            proj.pending.pop(item.kind, None)
            proj.running = item.job_id
            events = proj.events[item.kind]
            task_ids: tuple[int, ...] = ()
            if item.kind != ROUND:
                task_ids = tuple(sorted(proj.task_ids))
                proj.task_ids.clear()
        ctx = JobContext(item.kind, item.project_id, item.job_id, events, task_ids, None, "embedded", self.store,
                         successor_waiting=lambda: item.kind in proj.pending,
                         submit_round=lambda: self.submit(ROUND, item.project_id),
                         activity=lambda: self.activity(item.project_id))
        token = set_current_job(ctx)
        started = time.time()
        try:
            target = resolve(self.targets[item.kind])
            if item.kind == ROUND:
                target(item.project_id)
            else:
                target(item.project_id, list(task_ids))
        except Exception as exc:  # noqa: BLE001 - reported below and retried
            will_retry = item.attempt < self.retries and is_retryable(exc)
            outcome = Outcome.RETRYING if will_retry else Outcome.FAILED
            with self._lock:
                proj.running = None
                proj.task_ids.update(task_ids)
                self.jobs[outcome] += 1
                if will_retry and item.kind not in proj.pending:
                    proj.pending[item.kind] = item.job_id
                    delay = self.backoff[min(item.attempt, len(self.backoff) - 1)]
                    self._items.append(
                        _Item(item.kind, item.project_id, item.job_id, time.monotonic() + delay, item.attempt + 1)
                    )
                    self._lock.notify_all()
            logger.error("project %s: %s job %s %s: %r", item.project_id, item.kind, item.job_id, outcome, exc,
                         exc_info=True)
            record_job_outcome(item.project_id, item.kind, item.job_id, outcome, error=failure_message(exc),
                               store=self.store, attempt=item.attempt + 1)
            return
        finally:
            reset_current_job(token)
        with self._lock:
            proj.running = None
            self.jobs[Outcome.SUCCEEDED] += 1
        record_job_outcome(item.project_id, item.kind, item.job_id, Outcome.SUCCEEDED, store=self.store,
                           seconds=round(time.time() - started, 3))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            projects = {
                pid: {
                    **{f"pend_{k}": v for k, v in p.pending.items()},
                    **({"run_id": p.running} if p.running else {}),
                    **{f"events_{k}": str(v) for k, v in p.events.items()},
                    **{k: str(v) for k, v in p.counters.items()},
                }
                for pid, p in self._projects.items()
            }
            queued = len(self._items)
            running = sum(1 for p in self._projects.values() if p.running)
            jobs = {"queued": queued, "started": running, **{str(k): v for k, v in self.jobs.items()}}
        return {"mode": "embedded", "queue": "embedded", "threads": self.threads, "queue_depth": queued,
                "jobs": jobs, "projects": projects}

    def idle(self) -> bool:
        """No job queued or running (tests and shutdown use it)."""
        with self._lock:
            return not self._items and not self._taken and not any(p.running for p in self._projects.values())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
