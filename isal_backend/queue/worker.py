"""``python -m isal_backend worker [--burst] [--name NAME]``: an RQ worker for the backend's queue.

Jobs run in the worker process itself (RQ's :class:`~rq.SimpleWorker`, no fork per job): what a round
builds for a project and the next one reuses (the task mirror's copy, the feature cache's index, the
projected features) stays in memory between rounds, so a round of a 100,000-task project reads only what
changed. A job that crashes the process is recovered like a killed worker (leases and the sweeper).

Besides RQ's work loop it runs, on threads of the worker process:

* the coalescing sweeper (at start and every half lease), so a project whose worker was killed mid-job is
  recovered even if no new event arrives; it also queues webhook events journaled while Redis was down
  (:mod:`isal_backend.queue.journal`) and, every ISAL_RECONCILE_SECONDS, starts rounds for annotations
  whose webhook never arrived (:mod:`isal_backend.queue.reconcile`);
* the retry scheduler (:class:`RetryScheduler`): RQ's scheduler, which moves RQ ``Retry`` jobs back to the
  queue when their backoff is over, run so that a killed worker cannot hold it up.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.scripts import release_lock

from isal_backend.priority import lower_priority
from isal_backend.queue.base import ROUND
from isal_backend.queue.journal import Journal
from isal_backend.queue.reconcile import Reconciler, RedisMemory
from isal_backend.queue.redis_queue import RedisCoalescer
from isal_backend.settings import Settings, SettingsError, configure_logging

logger = logging.getLogger(__name__)
SCHEDULER_TICK_S = 1.0
#: A scheduler whose heartbeat (every second while alive) has not moved for this long is taken to be dead.
STALE_SCHEDULER_S = 5.0


class RetryScheduler:
    """RQ's scheduler on a thread of every worker, taking over the lock of a scheduler that died.

    RQ runs its scheduler in a child process of one worker, holding ``rq:scheduler-lock:<queue>`` with a
    61 s TTL; the other workers only try to take the lock in their maintenance, every 10 minutes. A worker
    killed with SIGKILL therefore left every retry of the queue unscheduled for up to 11 minutes. Here each
    worker ticks every second with RQ's own :class:`~rq.scheduler.RQScheduler` (same lock, same metadata,
    so plain ``rq worker --with-scheduler`` processes interoperate): it holds the lock, heartbeats and
    enqueues due jobs, or, when another scheduler holds it, watches that holder's heartbeat and, once it
    has not moved for :data:`STALE_SCHEDULER_S` (by this process's clock, so hosts' clocks need not agree),
    releases the dead holder's lock (RQ's token-checked script) and takes it. Retries then run within
    their backoff plus about 6 s of a worker's death.
    """

    def __init__(self, queue_names: Iterable[str], connection: Redis, stale_s: float = STALE_SCHEDULER_S,
                 log_level: str = "INFO") -> None:
        self.rq = RQScheduler(list(queue_names), connection=connection, interval=1, logging_level=log_level)
        self.connection = connection
        self.stale_s = stale_s
        self._seen: dict[str, tuple[bytes | None, float]] = {}
        self._born = False

    def _dead_holder(self, queue_name: str) -> str | None:
        """The holder of the queue's lock if its heartbeat stopped moving ``stale_s`` ago, else None."""
        raw = self.connection.get(RQScheduler.get_locking_key(queue_name))
        if raw is None:
            return None
        holder = raw.decode() if isinstance(raw, bytes) else str(raw)
        if holder == self.rq.name:
            return None
        beat = self.connection.hget(SCHEDULER_KEY_TEMPLATE % holder, "last_heartbeat")
        now = time.monotonic()
        seen = self._seen.get(holder)
        if seen is None or seen[0] != beat:
            self._seen = {**{k: v for k, v in self._seen.items() if now - v[1] < 3600}, holder: (beat, now)}
            return None
        return holder if now - seen[1] >= self.stale_s else None

    def tick(self) -> set[str]:
        """One scheduler step; returns the queues whose scheduling this worker now does."""
        wanted = set(self.rq._queue_names)
        if self.rq.acquired_locks != wanted:
            for name in wanted - self.rq.acquired_locks:
                holder = self._dead_holder(name)
                if holder is not None and release_lock(self.connection, RQScheduler.get_locking_key(name), holder):
                    logger.warning("scheduler %s of queue %s stopped heartbeating %.0f s ago (its worker died?): "
                                   "taking its lock so that retries run on time", holder, name, self.stale_s)
            self.rq.acquire_locks()
        if not self.rq.acquired_locks:
            return set()
        if not self._born:
            self.rq.register_birth()
            self._born = True
        self.rq.heartbeat()
        self.rq.enqueue_scheduled_jobs()
        return set(self.rq.acquired_locks)

    def stop(self) -> None:
        """Release the locks (another worker's scheduler takes over at once) and remove the metadata."""
        if self._born or self.rq.acquired_locks:
            self.rq.stop()


def _every(stop: threading.Event, interval_s: float, what: str, step: Callable[[], Any]) -> None:
    while not stop.wait(interval_s):
        _guarded(what, step)


def _guarded(what: str, step: Callable[[], Any]) -> None:
    try:
        step()
    except Exception:  # noqa: BLE001 - keep going after a Redis blip
        logger.warning("%s failed", what, exc_info=True)


class Sweeper:
    """The worker's periodic upkeep: leases, the webhook journal, reconciliation (see the module doc)."""

    def __init__(self, co: RedisCoalescer, settings: Settings) -> None:
        self.co, self.settings = co, settings
        self.journal = Journal.for_model_dir(settings.model_dir)
        self.reconciler = Reconciler(settings, submit=lambda pid: co.submit(ROUND, pid), busy=self._busy,
                                     memory=RedisMemory(co.redis, f"{co.prefix}:reconciled"))
        self._next_reconcile = time.monotonic() + min(settings.reconcile_seconds, 10.0)

    def _busy(self, project_id: int) -> bool:
        fields = self.co.redis.hgetall(self.co.project_key(project_id))
        return any(k in fields for k in (b"run_id", b"pend_round"))

    def step(self) -> None:
        _guarded("coalescing sweep", self.co.sweep)
        _guarded("journal replay", self.replay_journal)
        period = self.settings.reconcile_seconds
        if period > 0 and time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + period
            _guarded("reconciliation", self.reconcile)

    def replay_journal(self) -> int:
        if not self.journal.has_pending():
            return 0
        n = self.journal.drain(lambda e: self.co.submit(e.kind, e.project_id, list(e.task_ids)))
        if n:
            logger.warning("queued %d webhook event(s) journaled while Redis was unavailable", n)
        return n

    def reconcile(self) -> list[dict[str, Any]]:
        """Once per period across all workers (a Redis lock that expires before the next period)."""
        lock = f"{self.co.prefix}:reconcile-lock"
        if not self.co.redis.set(lock, "1", nx=True, px=max(1, int(self.settings.reconcile_seconds * 900))):
            return []
        return self.reconciler.run_once()


def preload_job_code() -> float:
    """Import the job code (torch, torchvision, the optimiser machinery) at start, before the first job.

    Otherwise the first round pays for it (measured: about 6 s on 2 cores) while its annotator waits.
    """
    start = time.perf_counter()
    import torch._dynamo  # noqa: F401 - torch.optim's LBFGS pulls it in on first use

    import isal_backend.jobs.entry  # noqa: F401 - the round, both task kinds, torch
    import isal_backend.jobs.shards  # noqa: F401

    seconds = time.perf_counter() - start
    logger.info("job code preloaded in %.1f s", seconds)
    return seconds


def main(args: argparse.Namespace) -> int:
    """Run the worker until stopped (or until the queue is empty with ``--burst``)."""
    settings = Settings.from_env()
    if not settings.redis_url:
        raise SettingsError(
            "REDIS_URL is not set: the worker needs Redis (e.g. REDIS_URL=redis://127.0.0.1:6379/0, the same value "
            "as the server's); without REDIS_URL the server runs jobs itself and no worker is needed"
        )
    configure_logging(settings)
    preload_job_code()
    conn = Redis.from_url(settings.redis_url)
    conn.ping()
    co = RedisCoalescer.from_settings(settings)
    recovered = co.sweep()
    if recovered:
        logger.warning("startup sweep recovered %d lost job(s)", len(recovered))
    scheduler = RetryScheduler([settings.rq_queue], conn, log_level=settings.log_level)
    sweeper = Sweeper(co, settings)
    _guarded("journal replay", sweeper.replay_journal)
    stop = threading.Event()
    threads = [
        threading.Thread(target=_every, args=(stop, max(0.5, settings.lease_seconds / 2), "sweep", sweeper.step),
                         daemon=True, name="isal-sweeper"),
        threading.Thread(target=_every, args=(stop, SCHEDULER_TICK_S, "retry scheduler", scheduler.tick),
                         daemon=True, name="isal-scheduler"),
    ]
    scheduler.tick()  # before the first job: a due retry need not wait a tick
    for thread in threads:
        thread.start()
    worker = SimpleWorker([Queue(settings.rq_queue, connection=conn)], connection=conn,
                          name=getattr(args, "name", None))
    nice = lower_priority(settings.worker_nice)  # the jobs run on this thread; the sweeper's keep their priority
    logger.info("worker %s on queue %s, niceness %d (%r)", worker.name, settings.rq_queue, nice, settings)
    try:
        # with_scheduler=False: RetryScheduler above is RQ's scheduler, run so that a dead worker cannot stall it.
        worker.work(burst=bool(getattr(args, "burst", False)), with_scheduler=False,
                    logging_level=settings.log_level)
    finally:
        stop.set()
        threads[1].join(timeout=5)
        scheduler.stop()
    return 0
