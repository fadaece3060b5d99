"""``python -m isal_backend worker [--burst] [--name NAME]``: an RQ worker for the backend's queue.

Besides RQ's work loop it runs the coalescing sweeper (at start and every half lease), so a project
whose worker was killed mid-job is recovered even if no new event arrives, and it runs RQ's scheduler,
which RQ Retry's backoff needs.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

from redis import Redis
from rq import Queue, Worker

from isal_backend.queue.redis_queue import RedisCoalescer
from isal_backend.settings import Settings, SettingsError, configure_logging

logger = logging.getLogger(__name__)


def _sweeper(co: RedisCoalescer, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        try:
            co.sweep()
        except Exception:  # noqa: BLE001 - keep sweeping after a Redis blip
            logger.warning("coalescing sweep failed", exc_info=True)


def preload_job_code() -> float:
    """Import the job code (torch, torchvision, the optimiser machinery) once, before RQ forks.

    RQ runs every job in a fresh fork of this process: what is imported here is inherited for free, what
    is not is imported again by every job (measured: about 6 s of a 10 s round on 2 cores). Only imports
    happen here, no torch computation, so the forks start from a clean thread pool.
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
    stop = threading.Event()
    thread = threading.Thread(
        target=_sweeper, args=(co, stop, max(0.5, settings.lease_seconds / 2)), daemon=True, name="isal-sweeper"
    )
    thread.start()
    worker = Worker([Queue(settings.rq_queue, connection=conn)], connection=conn, name=getattr(args, "name", None))
    logger.info("worker %s on queue %s (%r)", worker.name, settings.rq_queue, settings)
    try:
        worker.work(burst=bool(getattr(args, "burst", False)), with_scheduler=True, logging_level=settings.log_level)
    finally:
        stop.set()
    return 0
