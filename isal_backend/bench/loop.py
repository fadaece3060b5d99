"""``bench loop``: the live loop against a real Label Studio, end to end, up to 100,000 tasks.

It starts Label Studio (from ``LS_VENV``), the backend under gunicorn and ``--workers`` RQ workers on the
local Redis. The project's images are files, imported in batches as a real project of that size would be
(data URLs would make every task list megabytes): by default in Label Studio's local-files storage
(``/data/local-files/?d=``); with ``images="static"`` on a loopback static file server instead (allowed by
``ISAL_IMAGE_HOSTS_ALLOWED``, as an internal image host would be), so that the first featurization measures
the backend and its workers rather than Label Studio's file view, which serves on one core.
It connects the backend with ``POST /api/ml`` and labels a first batch; the first round's
time (which featurizes every image once, shared among the workers) is reported on its own.

Then, as an annotator would, it repeatedly takes the task ``/next`` serves and submits its annotation,
and measures the **freshness**: the seconds from that submission until Label Studio serves the order of
a new round (the project's ``model_version`` switches to it). Its baselines, measured in the same run:
the round's own duration and its parts (fetch, features, fit, s_test, score, write-back), and
``/next`` with the backend idle against ``/next`` while a round runs. Last, ``/webhook`` latency with
100 events in flight (Label Studio sends webhooks synchronously with a 1 s timeout).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from isal_backend.bench.stack import (
    REPO,
    backend_env,
    clear_redis,
    label_studio_database,
    run_in_workdir,
    start_backend,
    start_label_studio,
    start_static_server,
    start_worker,
)
from isal_backend.bench.webhook_latency import measure_webhook_latency, percentile
from isal_backend.labelstudio.client import LabelStudioClient
from isal_backend.store import ModelStore

CLASSES = ("red", "blue")
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          + "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>")
IMPORT_BATCH = 5000
FILES_FOLDER = "bench"
IMAGE_SOURCES = ("local-files", "static")


def image_png(rng: np.random.Generator, label: int) -> bytes:
    """A 32x32 noisy image whose dominant channel is the class: learnable, all distinct."""
    pixels = rng.integers(0, 120, size=(32, 32, 3), dtype=np.uint8)
    pixels[..., 0 if label == 0 else 2] += rng.integers(60, 135, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_images(root: Path, labels: np.ndarray, seed: int = 0, base_url: str | None = None) -> list[str]:
    """One PNG per task under ``root/bench/<thousands>/``; returns each one's reference for the task: its
    local-files path, or its URL under ``base_url`` (a static server of ``root``)."""
    rng = np.random.default_rng(seed)
    refs = []
    for i, label in enumerate(labels.tolist()):
        rel = f"{FILES_FOLDER}/{i // 1000:03d}/{i}.png"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_png(rng, int(label)))
        refs.append(f"{base_url}/{rel}" if base_url else f"/data/local-files/?d={rel}")
    return refs


class Session:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, f"{self.url}{path}", timeout=600, **kwargs)
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def annotate(self, task_id: int, label: str) -> None:
        self.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": [
            {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]})


class NextProbe:
    """``/next`` asked every ``interval_s`` on its own session (as another annotator's browser would)."""

    def __init__(self, session: Session, project: int, interval_s: float = 0.25) -> None:
        self.session, self.project, self.interval_s = session, project, interval_s
        self.latencies: list[float] = []
        self.errors: list[str] = []  #: each 5xx: when, the call, Label Studio's answer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def once(self) -> None:
        start = time.perf_counter()
        path = f"/api/projects/{self.project}/next"
        r = self.session.http.get(f"{self.session.url}{path}", timeout=300)
        self.latencies.append(time.perf_counter() - start)
        if r.status_code >= 500:
            self.errors.append(server_error("GET", path, r))

    def __enter__(self) -> NextProbe:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.once()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=300)


def server_error(method: str, path: str, answer: requests.Response) -> str:
    """One Label Studio 5xx as the benchmarks report it: when, which call, what Label Studio answered."""
    return f"{time.time():.3f} {method} {path}: HTTP {answer.status_code} {answer.text[:200]!r}"


def next_task(lsapi: Session, project: int) -> int:
    return int(lsapi.call("GET", f"/api/projects/{project}/next")["id"])


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


def _ms(values: list[float], q: float) -> float:
    return round(1000 * percentile(values, q), 1) if values else float("nan")


def run(tasks: int, repeats: int, work: Path, ls_venv: Path, redis_url: str, workers: int = 1,
        extra_env: dict[str, str] | None = None, database: str = "sqlite", images: str = "local-files",
        ls_settings: dict[str, str] | None = None) -> dict[str, Any]:
    """``database``: ``sqlite`` (Label Studio's default) or ``postgres`` (a fresh database on the PostgreSQL
    server of PGHOST/PGPORT/PGUSER, default 127.0.0.1:5432, dropped at the end). ``images``: where the
    tasks' images are served from, ``local-files`` (Label Studio) or ``static`` (a loopback file server).
    ``ls_settings``: Label Studio's own environment beyond the stack's (its feature flags)."""
    if images not in IMAGE_SOURCES:
        raise ValueError(f"images must be one of {IMAGE_SOURCES}, not {images!r}")
    with label_studio_database(database) as db_name:
        figures = _run(tasks, repeats, work, ls_venv, redis_url, workers, extra_env, db_name, images, ls_settings)
    return {**figures, "database": database, "label_studio_settings": dict(ls_settings or {})}


def _run(tasks: int, repeats: int, work: Path, ls_venv: Path, redis_url: str, workers: int,
         extra_env: dict[str, str] | None, db_name: str | None, images: str,
         ls_settings: dict[str, str] | None) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=tasks)
    ls = start_label_studio(ls_venv, work / "label-studio", db_name, settings=ls_settings)
    prefix = f"isal-bench-{uuid.uuid4().hex[:8]}"
    backend = static = None
    pool: list[Any] = []
    try:
        static_env = {}
        if images == "static":
            static = start_static_server(ls.files_root, work / "static.log")
            static_env = {"ISAL_IMAGE_HOSTS_ALLOWED": "127.0.0.1"}
        started = time.perf_counter()
        refs = write_images(ls.files_root, labels, base_url=static.url if static else None)
        write_seconds = time.perf_counter() - started
        env = backend_env(work / "models", redis_url, {"ISAL_REDIS_PREFIX": prefix, "RQ_QUEUE": prefix,
                                                       "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token,
                                                       **static_env, **(extra_env or {})})
        backend = start_backend(env, work / "backend.log")
        pool = [start_worker(env, work / f"worker{i}.log") for i in range(workers)]
        lsapi = Session(ls.url, ls.token)
        project = lsapi.call("POST", "/api/projects",
                             json={"title": f"bench loop {tasks}", "label_config": CONFIG})["id"]
        lsapi.call("POST", "/api/storages/localfiles", json={"project": project, "title": "bench images",
                                                             "path": str(ls.files_root / FILES_FOLDER),
                                                             "use_blob_urls": True, "regex_filter": r".*\.png"})
        started = time.perf_counter()
        for start in range(0, tasks, IMPORT_BATCH):
            lsapi.call("POST", f"/api/projects/{project}/import",
                       json=[{"image": ref} for ref in refs[start : start + IMPORT_BATCH]])
        import_seconds = time.perf_counter() - started
        with LabelStudioClient(ls.url, ls.token) as client:
            ids = client.task_ids(project)
        truth = dict(zip(ids, labels.tolist(), strict=True))
        # Label Studio alone, nothing else running: the baseline of /next.
        idle_probe = NextProbe(lsapi, project)
        for _ in range(20):
            idle_probe.once()
        lsapi.call("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "isal"})
        store = ModelStore(work / "models")

        seed_ids = [i for i in ids if truth[i] == 0][:10] + [i for i in ids if truth[i] == 1][:10]
        started = time.perf_counter()
        for task_id in seed_ids:
            lsapi.annotate(task_id, CLASSES[truth[task_id]])
        first = wait_for(lambda: (s := store.load(project)) and s.report.get("labeled") == 20 and s.report,
                         timeout_s=6 * 3600, what="first round on 20 labels", poll_s=1.0)
        first_seconds = time.perf_counter() - started
        # A large import is featurized over several rounds (ISAL_ROUND_NEW_IMAGES a round): wait for the last.
        done = wait_for(lambda: (s := store.load(project)) and s.report.get("labeled") == 20
                        and not s.report.get("features_pending") and s.report, timeout_s=12 * 3600,
                        what="every image featurized", poll_s=1.0)
        featurized_seconds = time.perf_counter() - started
        wait_for(lambda: idle(backend.url, project), 3600, "an idle project after the first rounds", 0.5)

        fresh, rounds = [], []
        busy_probe = NextProbe(Session(ls.url, ls.token), project)
        for _ in range(repeats):
            before = lsapi.call("GET", f"/api/projects/{project}")["model_version"]
            task_id = next_task(lsapi, project)
            start = time.perf_counter()
            with busy_probe:  # /next while the round runs, from another session
                lsapi.annotate(task_id, CLASSES[truth[task_id]])
                new_version = wait_for(
                    lambda before=before: (v := lsapi.call("GET", f"/api/projects/{project}")["model_version"])
                    != before and v, timeout_s=3600, what="the new order")
                fresh.append(time.perf_counter() - start)
            # the round commits its model right after Label Studio serves its order
            rounds.append(wait_for(lambda v=new_version: v in store.rounds(project)
                                   and store.load(project, v).report, 300, "the round's report"))
            wait_for(lambda: idle(backend.url, project), 3600, "an idle project (its clean-up included)", 0.2)

        latency = measure_webhook_latency(f"{backend.url}/webhook", 500, 100, projects=(project,))
        median_round = {k: statistics.median(r["timings"].get(k, 0.0) for r in rounds) for k in rounds[0]["timings"]}
        return {
            "tasks": tasks,
            "workers": workers,
            "images": images,
            "freshness_seconds": round(statistics.median(fresh), 3),
            "freshness_all_seconds": [round(f, 3) for f in fresh],
            "round_seconds": round(median_round["total_seconds"], 3),
            "round_timings": median_round,
            "fetch_seconds": round(median_round["fetch_seconds"], 3),
            "fetch_modes": [r.get("fetch", {}).get("mode") for r in rounds],
            "written_per_round": rounds[-1]["written"],
            "first_round_seconds": round(first_seconds, 1),
            "first_round_timings": first["timings"],
            "first_round_shards": first.get("shards"),
            "first_round_pending_images": first.get("features_pending", 0),
            "all_featurized_seconds": round(featurized_seconds, 1),
            "last_featurizing_round": done["round_id"],
            "images_write_seconds": round(write_seconds, 1),
            "import_seconds": round(import_seconds, 1),
            "idle_next_p50_ms": _ms(idle_probe.latencies, 50), "idle_next_p99_ms": _ms(idle_probe.latencies, 99),
            "busy_next_p50_ms": _ms(busy_probe.latencies, 50), "busy_next_p99_ms": _ms(busy_probe.latencies, 99),
            "busy_next_samples": len(busy_probe.latencies),
            "next_5xx": len(idle_probe.errors) + len(busy_probe.errors),
            "next_5xx_details": idle_probe.errors + busy_probe.errors,
            "webhook_p50_ms": round(latency["p50_ms"], 2),
            "webhook_p99_ms": round(latency["p99_ms"], 2),
            "webhook_errors": latency.get("errors", 0),
        }
    finally:
        for service in (*pool, backend, static, ls):
            if service is not None:
                service.stop()
        clear_redis(redis_url, prefix)


def main(args: argparse.Namespace) -> int:
    ls_venv = Path(args.ls_venv or os.environ.get("LS_VENV") or REPO / ".ls-venv")
    extra = dict(item.split("=", 1) for item in args.env or [])
    ls_settings = dict(item.split("=", 1) for item in args.ls_env or [])
    figures = run_in_workdir(
        "isal-bench-loop-", "bench loop",
        lambda work: run(args.tasks, args.repeats, work, ls_venv, args.redis_url, args.workers, extra, args.database,
                         args.images, ls_settings),
        args.json, keep=args.keep_workdir)
    print(f"tasks {figures['tasks']}, {figures['workers']} worker(s), Label Studio on {figures['database']}, "
          f"images from {figures['images']}: "
          f"freshness {figures['freshness_seconds']} s (median of {args.repeats}); "
          f"baseline: the round itself {figures['round_seconds']} s, of which fetch {figures['fetch_seconds']} s "
          f"({figures['fetch_modes']}); first round {figures['first_round_seconds']} s; "
          f"/next p99 {figures['busy_next_p99_ms']} ms during rounds against {figures['idle_next_p99_ms']} ms idle")
    print(json.dumps(figures, indent=2))
    return 0
