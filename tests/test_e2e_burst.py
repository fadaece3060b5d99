"""A burst of 500 webhooks for 3 real projects: every project ends with a model of its latest labels.

Real Label Studio, the backend under gunicorn, two RQ workers on the real Redis, real rounds. The
annotations are made in Label Studio (which sends its own webhooks), and 500 more events are fired at
``/webhook`` within seconds; the coalescing queue must neither lose the last state nor retrain more
than needed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from isal_backend.bench.stack import backend_env, start_backend, start_worker
from isal_backend.bench.webhook_latency import measure_webhook_latency
from isal_backend.queue.redis_queue import RedisCoalescer
from isal_backend.store import ModelStore
from tests.test_round_faults import CONFIG, choice, data_url

pytestmark = [pytest.mark.e2e, pytest.mark.redis]
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def services(label_studio: Any, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    prefix = f"isal-burst-{uuid.uuid4().hex[:8]}"
    env = backend_env(tmp_path / "models", REDIS_URL, {
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
        "ISAL_BACKBONE": "small-cnn", "ISAL_REDIS_PREFIX": prefix, "RQ_QUEUE": prefix})
    backend = start_backend(env, tmp_path / "backend.log")
    workers = [start_worker(env, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        yield backend.url, tmp_path / "models", prefix
    finally:
        for service in [*workers, backend]:
            service.stop()
        r = redis.Redis.from_url(REDIS_URL)
        for key in [*r.scan_iter(f"{prefix}*"), *r.scan_iter(f"rq:*{prefix}*")]:
            r.delete(key)


def test_a_burst_ends_in_the_right_model_per_project(label_studio: Any, services: tuple[str, Path, str]) -> None:
    backend_url, model_dir, prefix = services
    api, headers = label_studio.url + "/api", label_studio.legacy_headers
    projects, expected = [], {}
    for p in range(3):
        project = requests.post(f"{api}/projects", json={"title": f"burst {p}", "label_config": CONFIG},
                                headers=headers, timeout=60).json()["id"]
        images = [{"image": data_url((200, 30, 30) if i % 2 else (30, 30, 200), 100 * p + i)} for i in range(20)]
        requests.post(f"{api}/projects/{project}/import", json=images, headers=headers, timeout=60).raise_for_status()
        requests.post(f"{api}/ml", json={"url": backend_url, "project": project, "title": "isal"}, headers=headers,
                      timeout=60).raise_for_status()
        projects.append(project)
    start = time.monotonic()
    for p, project in enumerate(projects):
        tasks = requests.get(f"{api}/tasks", params={"project": project}, headers=headers, timeout=60).json()["tasks"]
        labeled = tasks[: 6 + 2 * p]  # 6, 8, 10 labels: each project's final model must show its own count
        for i, task in enumerate(labeled):
            requests.post(f"{api}/tasks/{task['id']}/annotations", json={"result": choice("red" if i % 2 else "blue")},
                          headers=headers, timeout=60).raise_for_status()
        expected[project] = len(labeled)
    burst = measure_webhook_latency(f"{backend_url}/webhook", 500, 50, projects=projects)
    assert burst["errors"] == 0 and time.monotonic() - start < 120

    store = ModelStore(model_dir)
    coalescer = RedisCoalescer(redis.Redis.from_url(REDIS_URL), prefix=prefix, queue_name=prefix)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        snapshot = coalescer.snapshot()
        idle = all(not snapshot["projects"].get(p, {}).get(k) for p in projects for k in ("run_id", "pend_round"))
        done = all((s := store.load(p)) is not None and s.report["labeled"] == expected[p] for p in projects)
        if idle and done:
            break
        time.sleep(1)
    for project in projects:
        report = store.load(project).report
        assert report["labeled"] == expected[project], report  # the last state, nothing lost
        assert report["unlabeled"] == 20 - expected[project]
        fields = snapshot["projects"][project]
        events = int(fields.get("events_round", 0))
        runs = sum(int(v) for k, v in fields.items() if k.startswith("n_") and k.endswith("_round"))
        assert events >= 500 // 3 + expected[project] - 1  # every event arrived
        assert 1 <= runs <= 12, fields  # coalesced: a handful of rounds, not hundreds
        assert int(fields.get("n_failed_round", 0)) == 0, fields
