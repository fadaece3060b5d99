"""What a queue job can know about itself while it runs (job id, events it covers, task ids to score).

Set by the queue's runner around the job function, so job code keeps the simple signatures
``run_round(project_id)`` / ``score_new_tasks(project_id, task_ids)`` and can still ask.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobContext:
    """The running job: ``events_seen`` counts the project's events of this kind when it started."""

    kind: str
    project_id: int
    job_id: str
    events_seen: int
    task_ids: tuple[int, ...] = ()
    took_over_from: str | None = None
    mode: str = "redis"  # or "embedded"
    status_store: Any = None  # isal_backend.status.StatusStore
    #: Whether a job of the same kind and project waits behind this one (it will see a newer state).
    successor_waiting: Callable[[], bool] | None = None
    #: Queues another round of this project (absorbed if one already waits).
    submit_round: Callable[[], Any] | None = None
    #: Seconds since each of the project's recent annotator events, newest first (isal_backend.pacing).
    activity: Callable[[], list[float]] | None = None

    def superseded(self) -> bool:
        """True when a newer job of this kind waits: optional work (clean-up) can be left to it."""
        return bool(self.successor_waiting and self.successor_waiting())

    def follow_up(self) -> bool:
        """Ask for another round of this project (work this one left on purpose); False outside a queue."""
        if self.submit_round is None:
            return False
        self.submit_round()
        return True


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("isal_job", default=None)


def current_job() -> JobContext | None:
    """The queue job running in this thread, or None outside one."""
    return _current.get()


def set_current_job(ctx: JobContext | None) -> contextvars.Token:
    return _current.set(ctx)


def reset_current_job(token: contextvars.Token) -> None:
    _current.reset(token)
