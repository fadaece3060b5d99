"""``bench live``: simulated annotators against a real Label Studio, the stream's order against a random order.

``bench al`` measures the order offline; this measures what annotators get from the real stack (the pieces
of ``bench loop``: Label Studio, the backend under gunicorn, an RQ worker, images in local-files storage).
Per seed, two projects on the same images: the **stream** arm labels what ``/next`` serves, the **random**
arm labels a seeded random order while the backend still runs its rounds, so both arms' pre-labels come
from the same model. Every ``--every`` labels the annotators wait for the backend to catch up (no round
running or waiting, the round's ``labeled`` equal to the labels so far) and the held-out images (never
imported) are sent to ``/predict``: the accuracy of the pre-labels then depends on the order alone, not on
how fresh the model is. Freshness (submission to a new ``model_version``) is measured separately, on the
first label after each checkpoint, when the backend is idle.

Alongside: Label Studio's 5xx answers, ``/next`` as the annotators see it against two baselines: ``/next``
with the backend idle (one user, after each arm's labels) and **Label Studio alone** (the same annotators
labeling the same way on a project with no backend connected, before any round ran: what Label Studio
costs by itself under that load, 5xx included), the most predictions a project held, and which order the
first task came from.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from isal_backend.bench.datasets import label_config, load_fashion_mnist
from isal_backend.bench.loop import (
    CLASSES,
    FILES_FOLDER,
    IMPORT_BATCH,
    NextProbe,
    Session,
    _ms,
    idle,
    image_png,
    server_error,
    wait_for,
    write_images,
)
from isal_backend.bench.paths import resolve_data_root
from isal_backend.bench.stack import (
    REPO,
    backend_env,
    clear_redis,
    create_annotator,
    label_studio_database,
    run_in_workdir,
    start_backend,
    start_label_studio,
    start_worker,
)
from isal_backend.history import HistoryReader
from isal_backend.labelstudio.client import LabelStudioClient
from isal_backend.store import ModelStore
from isal_backend.times import parse_time

TEST_SIZE = 500
QUICK = {"tasks": 300, "labels": 50, "every": 25, "pause": 0.5}
DEFAULTS = {"tasks": 1000, "labels": 200, "every": 25, "pause": 1.0}
PREDICT_BATCH = 100
CATCH_UP_TIMEOUT_S = 900


@dataclass
class Images:
    """The pool (local-files references, imported) and the held-out set (data URLs, sent only to /predict)."""

    source: str
    classes: list[str]
    refs: list[str]
    truth: list[int]
    test_urls: list[str]
    test_truth: list[int]


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def prepare_images(files_root: Path, tasks: int) -> Images:
    """Fashion-MNIST (learnable, ten classes) if installed, else ``bench loop``'s two-colour images."""
    try:
        bench = load_fashion_mnist(resolve_data_root(), tasks, TEST_SIZE, seed=0)
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        labels = rng.integers(0, len(CLASSES), size=tasks)
        test = rng.integers(0, len(CLASSES), size=TEST_SIZE)
        test_rng = np.random.default_rng(1)
        return Images("synthetic", list(CLASSES), write_images(files_root, labels), labels.tolist(),
                      [_data_url(image_png(test_rng, int(y))) for y in test], test.tolist())
    refs = []
    for i, item in enumerate(bench.pool):
        rel = f"{FILES_FOLDER}/{i // 1000:03d}/{i}.png"
        (files_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (files_root / rel).write_bytes(bench.images(item.reference))
        refs.append(f"/data/local-files/?d={rel}")
    return Images("fashion-mnist", list(bench.classes), refs, [i.label for i in bench.pool],
                  [_data_url(bench.images(i.reference)) for i in bench.test], [i.label for i in bench.test])


class CountingSession(Session):
    """A Label Studio user's session that records 5xx answers in ``errors`` and retries them, so one error
    is a figure, not the end of the run. Each record says when, which call and Label Studio's answer (the
    report's ``ls_5xx_details``; their count is ``ls_5xx``)."""

    def __init__(self, url: str, token: str, errors: list[str]) -> None:
        super().__init__(url, token)
        self.errors = errors

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        for _ in range(5):
            r = self.http.request(method, f"{self.url}{path}", timeout=600, **kwargs)
            if r.status_code < 500:
                break
            self.errors.append(server_error(method, path, r))
            time.sleep(1)
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None


class PredictionCount:
    """The project's prediction count in Label Studio, sampled every ``interval_s`` (its maximum is the figure)."""

    def __init__(self, session: Session, project: int, interval_s: float = 0.5) -> None:
        self.session, self.project, self.interval_s = session, project, interval_s
        self.maximum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        state = self.session.call("GET", f"/api/projects/{self.project}")
        self.maximum = max(self.maximum, int(state.get("total_predictions_number") or 0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PredictionCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.sample()


@dataclass
class Run:
    """What every arm shares: the stack, the images, and the figures gathered across arms."""

    ls: Any
    backend_url: str
    store: ModelStore
    images: Images
    admin: CountingSession
    annotators: list[CountingSession]
    pause_s: float
    every: int
    labels: int
    errors: list[str] = field(default_factory=list)
    next_latencies: list[float] = field(default_factory=list)
    #: Each stream /next as [unix time it was asked, milliseconds], to set beside ``rounds``.
    next_timeline: list[list[float]] = field(default_factory=list)
    #: The stream projects' rounds: [started, finished] (unix times) and their step timings.
    rounds: list[dict[str, Any]] = field(default_factory=list)
    idle_latencies: list[float] = field(default_factory=list)
    #: /next on the project no backend is connected to, and Label Studio's 5xx answers there.
    alone_latencies: list[float] = field(default_factory=list)
    alone_errors: list[str] = field(default_factory=list)
    freshness: list[float] = field(default_factory=list)
    max_predictions: int = 0
    #: The largest adaptive write size of any stream round (the unit of the predictions target).
    max_write_size: int = 0
    first_served: list[str] = field(default_factory=list)

    @property
    def config(self) -> str:
        return label_config("classification", self.images.classes)

    def new_project(self, title: str) -> tuple[int, dict[int, int]]:
        """A project with every pool image imported; returns it and each task's true class."""
        project = self.admin.call("POST", "/api/projects", json={"title": title, "label_config": self.config})["id"]
        self.admin.call("POST", "/api/storages/localfiles", json={
            "project": project, "title": "bench images", "path": str(self.ls.files_root / FILES_FOLDER),
            "use_blob_urls": True, "regex_filter": r".*\.png"})
        refs = self.images.refs
        for start in range(0, len(refs), IMPORT_BATCH):
            self.admin.call("POST", f"/api/projects/{project}/import",
                            json=[{"image": ref} for ref in refs[start : start + IMPORT_BATCH]])
        with LabelStudioClient(self.ls.url, self.ls.token) as client:
            ids = client.task_ids(project)
        return project, dict(zip(ids, self.images.truth, strict=True))

    def caught_up(self, project: int, labeled: int) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            state = self.store.load(project)
            if state is not None and state.report.get("labeled") == labeled and idle(self.backend_url, project):
                return state.report
            return None

        return wait_for(done, CATCH_UP_TIMEOUT_S, f"the backend caught up with {labeled} labels", poll_s=0.25)

    def labeled_tasks(self, project: int) -> int:
        return int(self.admin.call("GET", f"/api/projects/{project}")["num_tasks_with_annotations"])

    def accuracy(self, project: int) -> float:
        """The held-out pre-labels of the backend's current model against the truth."""
        hits = 0
        urls, truth = self.images.test_urls, self.images.test_truth
        for start in range(0, len(urls), PREDICT_BATCH):
            tasks = [{"id": 10**9 + i, "data": {"image": urls[i]}}
                     for i in range(start, min(start + PREDICT_BATCH, len(urls)))]
            r = requests.post(f"{self.backend_url}/predict", json={
                "tasks": tasks, "project": f"{project}.1", "label_config": self.config}, timeout=600)
            r.raise_for_status()
            for task, result in zip(tasks, r.json()["results"], strict=True):
                try:
                    choice = result["result"][0]["value"]["choices"][0]
                except (KeyError, IndexError, TypeError):
                    continue  # no pre-label yet: a miss
                hits += choice == self.images.classes[truth[task["id"] - 10**9]]
        return hits / len(urls)

    def served_order(self, project: int, ids: list[int]) -> str:
        """Where the first task ``/next`` serves after connect-and-import comes from (issue 9, item 1)."""
        first = int(self.annotators[0].call("GET", f"/api/projects/{project}/next")["id"])
        state = self.store.load(project)
        if state is None:
            return "sequential" if first == min(ids) else "other"
        report = state.report
        if report.get("top_tasks") and first == report["top_tasks"][0]:
            order = str(report.get("order", ""))
            return "cold-start" if order.startswith("cold-start") else "isal" if order.startswith("isal") else order
        return "other"

    def arm(self, arm: str, seed: int) -> list[list[float]]:
        """One project labeled by the stream or in a seeded random order; its accuracy curve."""
        project, truth = self.new_project(f"bench live {arm} seed {seed}")
        ids = sorted(truth)
        self.admin.call("POST", "/api/ml", json={"url": self.backend_url, "project": project, "title": "isal"})
        self.caught_up(project, 0)  # the cold-start round that connecting starts
        self.first_served.append(self.served_order(project, ids))

        order = iter(random.Random(seed).sample(ids, len(ids)))
        lock = threading.Lock()

        def label_one(session: CountingSession) -> None:
            if arm == "stream":
                asked, start = time.time(), time.perf_counter()
                task_id = int(session.call("GET", f"/api/projects/{project}/next")["id"])
                self.next_latencies.append(time.perf_counter() - start)
                self.next_timeline.append([round(asked, 3), round(1000 * self.next_latencies[-1], 1)])
            else:
                with lock:
                    task_id = next(order)
            time.sleep(self.pause_s)  # the annotator looks at the image
            session.annotate(task_id, self.images.classes[truth[task_id]])

        curve: list[list[float]] = []
        labeled = 0
        with PredictionCount(self.admin, project) as count:
            while labeled < self.labels:
                chunk = min(self.every, self.labels - labeled)
                # freshness: the chunk's first label, submitted with the backend idle
                before = self.store.current_id(project)
                label_one(self.annotators[0])
                submitted = time.perf_counter()
                watcher = threading.Thread(target=self._watch, args=(project, before, submitted), daemon=True)
                watcher.start()
                self._share(chunk - 1, label_one)
                labeled += chunk
                watcher.join(timeout=CATCH_UP_TIMEOUT_S)
                # the tasks Label Studio holds labels for: a submission it answered 500 may still have been
                # saved, and the annotator's retry then labels that task twice
                report = self.caught_up(project, self.labeled_tasks(project))
                curve.append([labeled, round(self.accuracy(project), 4)])
                print(f"{arm} seed {seed}: {labeled} labels, held-out accuracy {curve[-1][1]:.3f} (the round's "
                      f"validation accuracy {report.get('validation_accuracy')}, order {report.get('order')})",
                      flush=True)
        self.max_predictions = max(self.max_predictions, count.maximum)
        history = HistoryReader().read(self.store.project_dir(project))
        sizes = [int(r["write_size"]) for r in history if isinstance(r.get("write_size"), int) and r["write_size"] > 0]
        self.max_write_size = max([self.max_write_size, *sizes])
        if arm == "stream":
            self.rounds += [round_span(r) for r in history if r.get("finished_at") and r.get("seconds")]
        # /next with the backend idle (caught up), on the same project: asked after the labels, so the
        # probe's locks (Label Studio locks a served task for its user) never change what annotators get
        probe = NextProbe(self.admin, project)
        for _ in range(20):
            probe.once()
        self.idle_latencies += probe.latencies
        self.errors += probe.errors
        return curve

    def alone(self) -> None:
        """The annotators label ``labels`` tasks as ``/next`` serves them on a project no backend is connected
        to: Label Studio's own ``/next`` and 5xx under the same load, the baseline of what the rounds cost."""
        project, truth = self.new_project("bench live: Label Studio alone")

        def label_one(session: CountingSession) -> None:
            start = time.perf_counter()
            task_id = int(session.call("GET", f"/api/projects/{project}/next")["id"])
            self.alone_latencies.append(time.perf_counter() - start)
            time.sleep(self.pause_s)
            session.annotate(task_id, self.images.classes[truth[task_id]])

        before = len(self.errors)  # nothing else asks Label Studio meanwhile: the new errors are its own
        with PredictionCount(self.admin, project):  # the stream arm's observer, so both bear its load
            self._share(self.labels, label_one)
        self.alone_errors = self.errors[before:]
        del self.errors[before:]

    def _share(self, count: int, label_one: Callable[[CountingSession], None]) -> None:
        """``count`` labels shared out among the annotators, each labeling one at a time until none are left."""
        lock = threading.Lock()
        left = [count]

        def annotator(session: CountingSession) -> None:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                label_one(session)

        threads = [threading.Thread(target=annotator, args=(s,)) for s in self.annotators]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _watch(self, project: int, before: str | None, submitted: float) -> None:
        """Freshness: until the backend commits a round after ``before`` (it serves the order just before).

        Read from the model store, not Label Studio: polling Label Studio 20 times a second would load it
        beside the annotators' ``/next`` in this arm only, and the ``alone`` baseline bears no such load."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.store.current_id(project) != before:
                self.freshness.append(time.perf_counter() - submitted)
                return
            time.sleep(0.05)


def round_span(entry: dict[str, Any]) -> dict[str, Any]:
    """A history line as the unix times it ran between, with its step timings (for ``next_timeline``)."""
    when = parse_time(entry["finished_at"])
    finished = when.timestamp() if when is not None else 0.0
    return {"started": round(finished - float(entry["seconds"]), 3), "finished": round(finished, 3),
            "timings": entry.get("timings", {}), "written": entry.get("written")}


def slow_next_during(timeline: list[list[float]], rounds: list[dict[str, Any]], threshold_ms: float
                     ) -> dict[str, int]:
    """How many /next slower than ``threshold_ms`` were asked while a round ran, and how many with none running."""
    out = {"during_a_round": 0, "between_rounds": 0}
    for asked, ms in timeline:
        if ms > threshold_ms:
            during = any(r["started"] <= asked <= r["finished"] for r in rounds)
            out["during_a_round" if during else "between_rounds"] += 1
    return out


def _mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    return [[points[0][0], round(statistics.mean(p[1] for p in points), 4)] for points in zip(*curves, strict=True)]


def run(tasks: int, labels: int, annotators: int, pause_s: float, seeds: int, every: int, work: Path,
        ls_venv: Path, redis_url: str, extra_env: dict[str, str] | None = None,
        database: str = "sqlite") -> dict[str, Any]:
    if labels > tasks:
        raise ValueError(f"--labels {labels} is more than --tasks {tasks}")
    with label_studio_database(database, "isal_live") as db_name:
        ls = start_label_studio(ls_venv, work / "label-studio", db_name)
        prefix = f"isal-live-{uuid.uuid4().hex[:8]}"
        env = backend_env(work / "models", redis_url, {"ISAL_REDIS_PREFIX": prefix, "RQ_QUEUE": prefix,
                                                       "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token,
                                                       **(extra_env or {})})
        services: list[Any] = [ls]
        try:
            images = prepare_images(ls.files_root, tasks)
            backend = start_backend(env, work / "backend.log")
            services += [backend, start_worker(env, work / "worker0.log")]
            errors: list[str] = []
            people = [CountingSession(ls.url, create_annotator(ls, f"annotator{i}@example.com", ls_venv), errors)
                      for i in range(annotators)]
            live = Run(ls, backend.url, ModelStore(work / "models"), images,
                       CountingSession(ls.url, ls.token, errors),
                       people, pause_s, every, labels, errors=errors)
            live.alone()  # first: no round has run yet, nothing of ours competes with it
            curves: dict[str, list[list[list[float]]]] = {"stream": [], "random": []}
            for seed in range(seeds):
                for arm in ("stream", "random"):
                    curves[arm].append(live.arm(arm, seed))
        finally:
            for service in reversed(services):
                service.stop()
            clear_redis(redis_url, prefix)
    fresh = [round(f, 3) for f in live.freshness]
    return {
        "tasks": tasks, "labels": labels, "annotators": annotators, "seeds": seeds, "every": every,
        "pause_seconds": pause_s, "database": database, "images": images.source, "classes": len(images.classes),
        "held_out": len(images.test_urls), "backbone": (extra_env or {}).get("ISAL_BACKBONE", "default"),
        "ls_5xx": len(live.errors), "ls_5xx_details": live.errors,
        "next_p50_ms": _ms(live.next_latencies, 50), "next_p99_ms": _ms(live.next_latencies, 99),
        "next_samples": len(live.next_latencies),
        "slow_next": slow_next_during(live.next_timeline, live.rounds, 2 * (_ms(live.idle_latencies, 99) or 0)),
        "next_timeline": live.next_timeline, "rounds": live.rounds,
        "idle_next_p50_ms": _ms(live.idle_latencies, 50), "idle_next_p99_ms": _ms(live.idle_latencies, 99),
        "alone_next_p50_ms": _ms(live.alone_latencies, 50), "alone_next_p99_ms": _ms(live.alone_latencies, 99),
        "alone_5xx": len(live.alone_errors), "alone_5xx_details": live.alone_errors,
        "next_p99_vs_alone": round(_ms(live.next_latencies, 99) / _ms(live.alone_latencies, 99), 2)
        if live.next_latencies and live.alone_latencies else None,
        "max_predictions_in_ls": live.max_predictions, "max_write_size": live.max_write_size,
        "predictions_per_write_size": round(live.max_predictions / live.max_write_size, 2)
        if live.max_write_size else None,
        "first_served_order": live.first_served[0], "first_served_orders": live.first_served,
        "freshness_seconds": fresh, "freshness_median_seconds": round(statistics.median(fresh), 3) if fresh else None,
        "stream_accuracy": _mean_curve(curves["stream"]), "random_accuracy": _mean_curve(curves["random"]),
        "stream_accuracy_per_seed": curves["stream"], "random_accuracy_per_seed": curves["random"],
    }


def plot(figures: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ("stream", "random"):
        points = figures[f"{arm}_accuracy"]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arm)
    ax.set_xlabel("labels")
    ax.set_ylabel(f"held-out accuracy ({figures['held_out']} images)")
    ax.set_title(f"bench live: {figures['images']}, {figures['tasks']} tasks, {figures['seeds']} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else DEFAULTS
    tasks, labels, every, pause = (getattr(args, k) if getattr(args, k) is not None else sizes[k]
                                   for k in ("tasks", "labels", "every", "pause"))
    extra = dict(item.split("=", 1) for item in args.env or [])
    if args.quick:
        extra.setdefault("ISAL_BACKBONE", "small-cnn")
    ls_venv = Path(args.ls_venv or os.environ.get("LS_VENV") or REPO / ".ls-venv")
    figures = run_in_workdir(
        "isal-bench-live-", "bench live",
        lambda work: run(tasks, labels, args.annotators, pause, args.seeds, every, work, ls_venv, args.redis_url,
                         extra, args.db),
        args.json, keep=args.keep_workdir)
    path = Path(args.json)
    png = Path(args.png) if args.png else path.with_suffix(".png")
    plot(figures, png)
    last = {arm: figures[f"{arm}_accuracy"][-1][1] for arm in ("stream", "random")}
    print(f"{tasks} tasks, {labels} labels, {args.annotators} annotator(s), Label Studio on {args.db}: held-out "
          f"accuracy stream {last['stream']} vs random {last['random']}; freshness median "
          f"{figures['freshness_median_seconds']} s; /next p99 {figures['next_p99_ms']} ms against "
          f"{figures['idle_next_p99_ms']} ms idle and {figures['alone_next_p99_ms']} ms with Label Studio alone "
          f"({figures['alone_5xx']} 5xx alone); at most {figures['max_predictions_in_ls']} predictions in Label "
          f"Studio ({figures['predictions_per_write_size']} x the largest write size); {figures['ls_5xx']} Label "
          f"Studio 5xx; wrote {path} and {png}")
    return 0
