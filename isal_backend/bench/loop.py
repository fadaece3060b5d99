"""``bench loop``: the live loop against a real Label Studio, end to end.

It starts Label Studio (from ``LS_VENV``), the backend under gunicorn and one RQ worker on the local
Redis, makes a project of ``--tasks`` small images, connects the backend with ``POST /api/ml`` and
labels a first batch. Then, as an annotator would, it repeatedly takes the task ``/next`` serves and
submits its annotation, and measures the **freshness**: the seconds from that submission until Label
Studio serves the order of a new round (the project's ``model_version`` switches to it). Its
baseline, measured in the same run, is the round's own duration and its parts (fetch, features,
scoring, write-back), so the queueing overhead shows. Last, ``/webhook`` latency with 100 events in
flight (Label Studio sends webhooks synchronously with a 1 s timeout).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis
import requests
from PIL import Image

from isal_backend.bench.stack import REPO, backend_env, start_backend, start_label_studio, start_worker
from isal_backend.bench.webhook_latency import measure_webhook_latency
from isal_backend.labelstudio.client import LabelStudioClient
from isal_backend.store import ModelStore

CLASSES = ("red", "blue")
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          + "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>")


def image_data_url(rng: np.random.Generator, label: int) -> str:
    """A 32x32 noisy image whose dominant channel is the class: learnable, all distinct."""
    pixels = rng.integers(0, 120, size=(32, 32, 3), dtype=np.uint8)
    pixels[..., 0 if label == 0 else 2] += rng.integers(60, 135, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Session:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, f"{self.url}{path}", timeout=300, **kwargs)
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def annotate(self, task_id: int, label: str) -> None:
        self.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": [
            {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]})


def next_task(lsapi: Session, project: int, errors: list[str], tries: int = 10) -> int:
    """``/next`` as the UI asks it; Label Studio on SQLite answers 500 ("database is locked") while another
    request holds a long write (deleting a round's predictions), so failures are retried and counted."""
    for _ in range(tries):
        r = lsapi.http.get(f"{lsapi.url}/api/projects/{project}/next", timeout=300)
        if r.status_code == 200:
            return r.json()["id"]
        errors.append(f"HTTP {r.status_code}")
        time.sleep(1)
    raise RuntimeError(f"/next failed {tries} times: {errors[-tries:]}")


def idle(backend_url: str, project: int) -> bool:
    """No round of the project runs or waits (the backend's /status)."""
    queue = requests.get(f"{backend_url}/status/{project}", timeout=30).json()["queue"]
    return queue["running"] is None and not any(queue["waiting"].values())


def wait_for(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


def run(tasks: int, repeats: int, work: Path, ls_venv: Path, redis_url: str) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=tasks)
    ls = start_label_studio(ls_venv, work / "label-studio")
    prefix = f"isal-bench-{uuid.uuid4().hex[:8]}"
    env = backend_env(work / "models", redis_url, {"ISAL_REDIS_PREFIX": prefix, "RQ_QUEUE": prefix,
                                                   "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token})
    backend = worker = None
    try:
        backend = start_backend(env, work / "backend.log")
        worker = start_worker(env, work / "worker.log")
        lsapi = Session(ls.url, ls.token)
        project = lsapi.call("POST", "/api/projects",
                             json={"title": f"bench loop {tasks}", "label_config": CONFIG})["id"]
        for start in range(0, tasks, 1000):
            chunk = [{"image": image_data_url(rng, int(y))} for y in labels[start : start + 1000]]
            lsapi.call("POST", f"/api/projects/{project}/import", json=chunk)
        with LabelStudioClient(ls.url, ls.token) as client:
            ids = [t["id"] for t in client.list_tasks(project)]
        truth = dict(zip(sorted(ids), labels.tolist(), strict=True))
        lsapi.call("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "isal"})
        store = ModelStore(work / "models")

        seed_ids = [i for i in sorted(ids) if truth[i] == 0][:10] + [i for i in sorted(ids) if truth[i] == 1][:10]
        for task_id in seed_ids:
            lsapi.annotate(task_id, CLASSES[truth[task_id]])
        first = wait_for(lambda: (s := store.load(project)) and s.report.get("labeled") == 20 and s.report,
                         timeout_s=3600, what="first round on 20 labels", poll_s=0.5)

        fresh, rounds = [], []
        next_latency: list[float] = []
        next_errors: list[str] = []
        for _ in range(repeats):
            before = lsapi.call("GET", f"/api/projects/{project}")["model_version"]
            t = time.perf_counter()
            task_id = next_task(lsapi, project, next_errors)
            next_latency.append(time.perf_counter() - t)
            start = time.perf_counter()
            lsapi.annotate(task_id, CLASSES[truth[task_id]])
            new_version = wait_for(
                lambda before=before: (v := lsapi.call("GET", f"/api/projects/{project}")["model_version"]) != before
                and v, timeout_s=600, what="the new order")
            fresh.append(time.perf_counter() - start)
            # the round commits its model right after Label Studio serves its order
            rounds.append(wait_for(lambda v=new_version: v in store.rounds(project)
                                   and store.load(project, v).report, 120, "the round's report"))
            wait_for(lambda: idle(backend.url, project), 600, "an idle project (its clean-up included)", 0.2)

        latency = measure_webhook_latency(f"{backend.url}/webhook", 500, 100, projects=(project,))
        median_round = {k: statistics.median(r["timings"][k] for r in rounds) for k in rounds[0]["timings"]}
        return {
            "tasks": tasks,
            "freshness_seconds": round(statistics.median(fresh), 3),
            "freshness_all_seconds": [round(f, 3) for f in fresh],
            "round_seconds": round(median_round["total_seconds"], 3),
            "round_timings": median_round,
            "write_back_seconds": round(median_round["write_back_seconds"], 3),
            "written_per_round": rounds[-1]["written"],
            "first_round_seconds": first["timings"]["total_seconds"],
            "next_task_seconds": round(statistics.median(next_latency), 3),
            "next_task_errors": len(next_errors),
            "webhook_p50_ms": round(latency["p50_ms"], 2),
            "webhook_p99_ms": round(latency["p99_ms"], 2),
            "webhook_errors": latency.get("errors", 0),
        }
    finally:
        for service in (worker, backend, ls):
            if service is not None:
                service.stop()
        r = redis.Redis.from_url(redis_url)
        for key in [*r.scan_iter(f"{prefix}*"), *r.scan_iter(f"rq:*{prefix}*")]:
            r.delete(key)


def main(args: argparse.Namespace) -> int:
    ls_venv = Path(args.ls_venv or os.environ.get("LS_VENV") or REPO / ".ls-venv")
    work = Path(tempfile.mkdtemp(prefix="isal-bench-loop-"))
    try:
        figures = run(args.tasks, args.repeats, work, ls_venv, args.redis_url)
    except BaseException:
        print(f"bench loop failed; the logs of Label Studio, the backend and the worker are in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"tasks {figures['tasks']}: freshness {figures['freshness_seconds']} s (median of {args.repeats}), "
          f"baseline: the round itself {figures['round_seconds']} s, of which write-back "
          f"{figures['write_back_seconds']} s; /next {figures['next_task_seconds']} s "
          f"({figures['next_task_errors']} failed and retried); webhook p50/p99 "
          f"{figures['webhook_p50_ms']}/{figures['webhook_p99_ms']} ms with 100 in flight")
    print(json.dumps(figures, indent=2))
    return 0
