"""Feature shards on the real Redis: every shard computed once, shared between workers, a dead one's taken over."""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from isal_backend.jobs.shards import ShardPlan, featurize_in_shards, run_shard
from isal_backend.settings import Settings

pytestmark = pytest.mark.redis
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    prefix = f"isal-test-shards-{uuid.uuid4().hex[:8]}"
    s = Settings(redis_url=REDIS_URL, model_dir=tmp_path, redis_prefix=prefix, rq_queue=prefix, shard_size=5,
                 shard_lease_seconds=60)
    yield s
    r = redis.Redis.from_url(REDIS_URL)
    for key in [*r.scan_iter(f"{prefix}*"), *r.scan_iter(f"rq:*{prefix}*")]:
        r.delete(key)


def _helper(settings: Settings, project_dir: str, plan_id: str, out: str, ready: Any) -> None:
    """A second worker: takes whatever shards it can claim, writes down the references it featurized."""
    plan = ShardPlan(settings, Path(project_dir), plan_id, redis.Redis.from_url(REDIS_URL))
    ready.set()  # started and connected: a slow interpreter start must not decide the test

    def featurize(refs: list[str]) -> None:
        time.sleep(0.2)
        with Path(out).open("a") as fh:
            fh.write("\n".join(refs) + "\n")

    deadline = time.monotonic() + 30
    while plan.redis.get(f"{plan.key}:count") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    count = int(plan.redis.get(f"{plan.key}:count") or 0)
    while plan.folder.exists() and time.monotonic() < deadline:
        for index in range(count):
            run_shard(plan, index, featurize)
        time.sleep(0.01)


def test_two_workers_share_a_round_and_compute_each_shard_once(settings: Settings, tmp_path: Path) -> None:
    refs = [f"img-{i}" for i in range(43)]
    out = tmp_path / "helper.txt"
    out.touch()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    helper = ctx.Process(target=_helper, args=(settings, str(tmp_path), "r1", str(out), ready))
    helper.start()
    assert ready.wait(120), "the helper worker did not start"
    mine: list[str] = []
    report = featurize_in_shards(settings, tmp_path, refs, lambda r: (time.sleep(0.2), mine.extend(r)), 1, "r1")
    helper.join(30)
    theirs = [line for line in out.read_text().splitlines() if line]
    assert report["count"] == 9 and len(report["computed_by"]) == 9
    assert sorted(mine + theirs) == sorted(refs), (sorted(mine), sorted(theirs))  # each image once, none lost
    assert theirs and mine  # both workers took part
    assert len(set(report["computed_by"])) == 2
    assert not (tmp_path / "shards" / "r1").exists()  # cleaned up
    queued = redis.Redis.from_url(REDIS_URL).llen(f"rq:queue:{settings.rq_queue}")
    assert queued == 9  # one RQ job per shard for other workers (they find the round finished)


def test_a_dead_workers_shard_is_taken_over_when_its_lease_ends(settings: Settings, tmp_path: Path) -> None:
    refs = [f"img-{i}" for i in range(10)]
    plan = ShardPlan(settings, tmp_path, "r2", redis.Redis.from_url(REDIS_URL))
    # a worker that claimed shard 0 and died: its claim expires after one second
    plan.redis.set(f"{plan.key}:claim:0", "dead-worker", ex=1)
    done: list[str] = []
    start = time.monotonic()
    report = featurize_in_shards(settings, tmp_path, refs, done.extend, 2, "r2")
    assert sorted(done) == sorted(refs)
    assert time.monotonic() - start >= 0.5  # it waited for the lease rather than computing twice
    assert "dead-worker" not in report["computed_by"]
