"""The webhook's way into the queue: submit to Redis, or journal the event when Redis does not answer.

With the Redis queue, a webhook that reaches the backend while Redis is down must still be kept:
Label Studio sends it once and never again. :class:`DurableSubmitter` submits each event to the
coalescer; on a Redis error it appends the event to the :class:`~isal_backend.queue.journal.Journal`
(fsynced) and answers "journaled", and its replayer thread queues the journal once Redis answers.
After a failure it skips Redis for :data:`BREAKER_S` (a Redis that hangs instead of refusing would
otherwise cost each webhook its connect timeout) and lets the replayer probe. The embedded queue has no
Redis to lose: its events go straight in, and no journal is kept.

It also tells ``/health`` how the queue is: ``ok``, or ``degraded`` while Redis does not answer or
journaled events wait (``/health`` still answers 200 then: Label Studio would otherwise mark the
backend disconnected, and the webhook keeps working).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from isal_backend.queue.base import Coalescer, Submission
from isal_backend.queue.journal import Journal, JournaledEvent, JournalReplayer
from isal_backend.settings import Settings, mask_url_password

logger = logging.getLogger(__name__)
BREAKER_S = 2.0
HEALTH_PING_TIMEOUT_S = 0.5
JOURNALED = "journaled"


class DurableSubmitter:
    """Submit-or-journal for one coalescer; thread-safe."""

    def __init__(self, coalescer: Coalescer, settings: Settings) -> None:
        self.coalescer = coalescer
        self.redis_url = settings.redis_url
        self.journal = Journal.for_model_dir(settings.model_dir) if settings.redis_url else None
        self.replayer = (JournalReplayer(self.journal, self._replay, on_drained=lambda _: self._up(),
                                         on_failed=self._down) if self.journal is not None else None)
        self._lock = threading.Lock()
        self._down_at: float | None = None
        self._error = ""
        self._ping_client: Any = None

    # -- state ---------------------------------------------------------------------------------------
    def _down(self, exc: BaseException) -> None:
        with self._lock:
            first = self._down_at is None
            self._down_at = time.monotonic()
            self._error = f"Redis at {mask_url_password(self.redis_url)} does not answer ({type(exc).__name__})"
        if first:
            logger.error("queue unavailable: %s; webhooks are journaled until it answers", self._error)

    def _up(self) -> None:
        with self._lock:
            was_down, self._down_at = self._down_at is not None, None
        if was_down:
            logger.warning("queue available again (Redis answers)")

    def _breaker_open(self) -> bool:
        with self._lock:
            return self._down_at is not None and time.monotonic() - self._down_at < BREAKER_S

    # -- events --------------------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start the replayer (and the embedded queue's threads) in this process: at app creation, and again
        on requests, since threads do not survive a fork (gunicorn ``--preload``)."""
        if self.replayer is not None:
            self.replayer.ensure_started()
        start = getattr(self.coalescer, "ensure_started", None)
        if start is not None:
            start()

    def submit(self, kind: str, project_id: int, task_ids: list[int] | None = None, action: str = "") -> Submission:
        """Queue the event, or keep it in the journal when Redis does not answer (``state == "journaled"``)."""
        if self.journal is None:
            return self.coalescer.submit(kind, project_id, task_ids)
        import redis

        if not self._breaker_open():
            try:
                submission = self.coalescer.submit(kind, project_id, task_ids)
            except redis.exceptions.RedisError as exc:
                self._down(exc)
            else:
                if self._down_at is not None:
                    self._up()
                return submission
        self.journal.append(JournaledEvent(kind, project_id, tuple(task_ids or ()), action, time.time()))
        if self.replayer is not None:
            self.replayer.ensure_started()
        return Submission(kind, project_id, "", JOURNALED, 0)

    def note_activity(self, project_id: int) -> None:
        """Tell the queue an annotator just acted (rounds pace their calls to Label Studio around it).

        A courtesy, never a reason to fail the webhook: skipped while Redis is down, errors only logged."""
        if self._breaker_open():
            return
        try:
            self.coalescer.note_activity(project_id)
        except Exception as exc:  # noqa: BLE001 - a lost note costs one round's pacing, nothing more
            logger.debug("project %s: annotator activity not recorded: %r", project_id, exc)

    def _replay(self, event: JournaledEvent) -> None:
        self.coalescer.submit(event.kind, event.project_id, list(event.task_ids))

    # -- health --------------------------------------------------------------------------------------
    def _ping(self) -> None:
        if self._ping_client is None:
            import redis

            self._ping_client = redis.Redis.from_url(self.redis_url, socket_timeout=HEALTH_PING_TIMEOUT_S,
                                                     socket_connect_timeout=HEALTH_PING_TIMEOUT_S)
        self._ping_client.ping()

    def health(self) -> dict[str, Any]:
        """``{"state": "ok" | "degraded", "journaled_events": n, "error": ...}`` for /health (never raises)."""
        if self.journal is None:
            return {"state": "ok"}
        if not self._breaker_open():
            try:
                self._ping()
            except Exception as exc:  # noqa: BLE001 - any failure to answer is "down"
                self._down(exc)
            else:
                if self._down_at is not None and not self.journal.has_pending():
                    self._up()
        try:
            pending = self.journal.pending()
        except OSError:
            pending = -1
        with self._lock:
            down, error = self._down_at is not None, self._error
        out: dict[str, Any] = {"state": "degraded" if down or pending else "ok", "journaled_events": pending}
        if down:
            out["error"] = error + "; webhooks are journaled and queued once it answers"
        elif pending:
            out["error"] = "journaled events are being queued"
        return out

    def close(self) -> None:
        if self.replayer is not None:
            self.replayer.stop()
