"""Per-project coalescing job queue: at most one job runs and at most one waits per project.

Two implementations with the same semantics: :class:`~isal_backend.queue.redis_queue.RedisCoalescer`
(RQ workers, REDIS_URL set) and :class:`~isal_backend.queue.embedded.EmbeddedCoalescer` (a thread in the
server process). :func:`make_coalescer` picks one from the settings; the embedded one imports neither
redis nor rq. Submodules import each other, never this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from isal_backend.queue.base import KINDS, ROUND, SCORE, Coalescer, Outcome, Submission
from isal_backend.queue.context import JobContext, current_job

if TYPE_CHECKING:
    from isal_backend.settings import Settings


def make_coalescer(settings: Settings) -> Coalescer:
    """Redis + RQ when REDIS_URL is set, else the embedded thread."""
    if settings.redis_url:
        from isal_backend.queue.redis_queue import RedisCoalescer

        return RedisCoalescer.from_settings(settings)
    from isal_backend.queue.embedded import EmbeddedCoalescer

    return EmbeddedCoalescer.from_settings(settings)


__all__ = ["KINDS", "ROUND", "SCORE", "Coalescer", "JobContext", "Outcome", "Submission", "current_job",
           "make_coalescer"]
