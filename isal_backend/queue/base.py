"""What both queue implementations share: job kinds, job outcomes, the submission record and the interface.

Plain definitions only (no Redis, no RQ), so the embedded queue and the server can use them without
importing either.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

ROUND = "round"
SCORE = "score"
KINDS = (ROUND, SCORE)


class Outcome(StrEnum):
    """How a job ended, as both queues record it in the project's status and counters."""

    SUCCEEDED = "succeeded"
    RETRYING = "retrying"  # failed; a retry is scheduled
    FAILED = "failed"  # failed and no retry is left
    LOST = "lost"  # its worker died; a recovery job redoes its work
    SUPERSEDED = "superseded"  # never ran: a newer waiting job of the same kind covers it

    @property
    def is_failure(self) -> bool:
        return self in (Outcome.FAILED, Outcome.LOST)


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

    def note_activity(self, project_id: int) -> None: ...

    def activity(self, project_id: int) -> list[float]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def is_retryable(exc: BaseException) -> bool:
    """False when the error, or one it was raised from, says that repeating the job cannot help.

    An exception class opts out with ``retryable = False`` (e.g. Label Studio refusing the key with 401/403:
    the fix is a new key, not a retry in 10 s, 60 s and 300 s). Both queues then fail the job at once.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "retryable", True) is False:
            return False
        current = current.__cause__ or current.__context__
    return True


def failure_message(exc: BaseException) -> str:
    """What a job failure is reported as in answers (/status, /metrics): type and message, no traceback."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_targets: dict[str, Callable[..., Any]] = {}


def resolve(path: str) -> Callable[..., Any]:
    """The job function named ``package.module.function`` (imported once per process)."""
    fn = _targets.get(path)
    if fn is None:
        module, _, name = path.rpartition(".")
        fn = getattr(importlib.import_module(module), name)
        _targets[path] = fn
    return fn
