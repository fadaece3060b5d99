"""Per-project coalescing job queue: at most one job runs and at most one waits per project.

Two implementations with the same semantics: :class:`~isal_backend.queue.redis_queue.RedisCoalescer`
(RQ workers, REDIS_URL set) and :class:`~isal_backend.queue.embedded.EmbeddedCoalescer` (a thread in the
server process). :func:`make_coalescer` picks one from the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from isal_backend.queue.context import KINDS, ROUND, SCORE, JobContext, current_job

if TYPE_CHECKING:
    from isal_backend.settings import Settings


@dataclass(frozen=True)
class Submission:
    """Result of an event: ``state`` is ``enqueued`` (a new waiting job) or ``absorbed`` (the waiting one covers it)."""

    kind: str
    project_id: int
    job_id: str
    state: str
    events: int


class Coalescer(Protocol):
    def submit(self, kind: str, project_id: int, task_ids: list[int] | None = None) -> Submission: ...

    def snapshot(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def make_coalescer(settings: Settings) -> Coalescer:
    """Redis + RQ when REDIS_URL is set, else the embedded thread."""
    if settings.redis_url:
        from isal_backend.queue.redis_queue import RedisCoalescer

        return RedisCoalescer.from_settings(settings)
    from isal_backend.queue.embedded import EmbeddedCoalescer

    return EmbeddedCoalescer.from_settings(settings)


__all__ = ["KINDS", "ROUND", "SCORE", "Coalescer", "JobContext", "Submission", "current_job", "make_coalescer"]
