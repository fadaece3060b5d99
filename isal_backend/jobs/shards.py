"""Split a round's costly part, the images' forward pass, into shard jobs that any worker can take.

Scoring from pixels is a backbone forward pass followed by a closed form that costs microseconds
per task (see ``bench speed``), so what is worth sharing between workers is the forward pass. The
round job cuts the uncached images into shards (a plan), writes each shard's references to the shared
``MODEL_DIR`` and enqueues one RQ job per shard (:func:`isal_backend.jobs.entry.featurize_shard`);
then it works through the shards itself too (work stealing), so a round finishes with one worker or
many, on one machine or several sharing Redis and ``MODEL_DIR``. Shards are claimed with a lease in
Redis: a shard whose worker died is taken over once its lease runs out. Features land in the project's
shared feature cache, where the round picks them up; an image that failed in a shard is retried by the
round and reported there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from rq import Queue

from isal_backend.settings import Settings

log = logging.getLogger(__name__)

SHARD_JOB = "isal_backend.jobs.entry.featurize_shard"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ShardPlan:
    """The shards of one featurization: references on disk, claims and completions in Redis."""

    def __init__(self, settings: Settings, project_dir: Path, plan_id: str, connection: redis.Redis) -> None:
        self.settings = settings
        self.plan_id = plan_id
        self.folder = project_dir / "shards" / plan_id
        self.redis = connection
        self.key = f"{settings.redis_prefix}:shards:{plan_id}"

    def write(self, references: list[str], size: int) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        count = 0
        for count, start in enumerate(range(0, len(references), size), start=1):
            tmp = self.folder / f".{count - 1}.json"
            tmp.write_text(json.dumps(references[start : start + size]))
            tmp.replace(self.folder / f"{count - 1}.json")
        self.redis.set(f"{self.key}:count", count, ex=24 * 3600)
        return count

    def references(self, index: int) -> list[str]:
        return json.loads((self.folder / f"{index}.json").read_text())

    def claim(self, index: int) -> bool:
        lease = max(60, int(self.settings.shard_lease_seconds))
        return bool(self.redis.set(f"{self.key}:claim:{index}", worker_name(), nx=True, ex=lease))

    def done(self, index: int) -> str | None:
        value = self.redis.get(f"{self.key}:done:{index}")
        return value.decode() if value else None

    def claimed(self, index: int) -> bool:
        return bool(self.redis.exists(f"{self.key}:claim:{index}"))

    def finish(self, index: int) -> None:
        # The claim stays until its lease ends: deleting it would let a worker that checked ``done`` just
        # before this line claim the shard again and compute it twice.
        self.redis.set(f"{self.key}:done:{index}", worker_name(), ex=24 * 3600)

    def cleanup(self, count: int) -> None:
        # Files first: once the keys are gone a late worker could claim a shard again, but with its
        # references gone it finds nothing to compute.
        for path in self.folder.glob("*.json"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()
        keys = [f"{self.key}:count"] + [f"{self.key}:{kind}:{i}" for i in range(count) for kind in ("claim", "done")]
        self.redis.delete(*keys)


def run_shard(plan: ShardPlan, index: int, featurize: Callable[[list[str]], Any]) -> bool:
    """Compute one shard if this worker can claim it; True when it did."""
    if plan.done(index) or not plan.claim(index):
        return False
    if plan.done(index):  # finished by another worker between the two checks above
        return False
    try:
        references = plan.references(index)
    except FileNotFoundError:  # the round finished (and cleaned up) meanwhile
        return False
    featurize(references)
    plan.finish(index)
    return True


def featurize_in_shards(
    settings: Settings, project_dir: Path, references: list[str], featurize: Callable[[list[str]], Any],
    project_id: int, plan_id: str | None = None, timeout_s: float = 6 * 3600,
) -> dict[str, Any]:
    """Share the features of ``references`` among all workers; returns who computed which shard."""
    connection = redis.Redis.from_url(settings.redis_url)
    plan_id = plan_id or f"plan-{uuid.uuid4().hex}"
    plan = ShardPlan(settings, project_dir, plan_id, connection)
    count = plan.write(references, settings.shard_size)
    queue = Queue(settings.rq_queue, connection=connection)
    for index in range(count):
        queue.enqueue(SHARD_JOB, project_id, plan_id, index,
                      job_id=f"{settings.redis_prefix}-shard-{plan_id}-{index}",
                      job_timeout=int(settings.shard_lease_seconds * 4), result_ttl=600, failure_ttl=3600)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            pending = [i for i in range(count) if not plan.done(i)]
            if not pending:
                break
            took = False
            for index in pending:  # work stealing: unclaimed shards, and shards whose worker's lease ran out
                if not plan.claimed(index):
                    took |= run_shard(plan, index, featurize)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} of {count} feature shards unfinished after {timeout_s} s")
            if not took:
                time.sleep(0.2)
        by = [plan.done(i) or "?" for i in range(count)]
    finally:
        plan.cleanup(count)
    return {"count": count, "size": settings.shard_size, "computed_by": by}
