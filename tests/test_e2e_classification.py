"""End to end: a real Label Studio 1.23.2, the backend under gunicorn, a real RQ worker on real Redis.

An image-classification project with 210 real CIFAR-10 images (uploaded as files), the backend
connected through ``POST /api/ml``, annotations made through the API as an annotator would; then the
labeling stream must serve the round's most valuable task first and the rest in its order. It runs
twice: Label Studio on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from isal_backend.bench.datasets import CIFAR10_ARCHIVE
from isal_backend.bench.stack import Postgres, Service, backend_env, create_annotator, start_backend, start_worker
from isal_backend.store import ModelStore
from tests.datafiles import data_file
from tests.servers import DATABASES, label_studio_on

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

CLASSES = ("airplane", "automobile", "frog")
PER_CLASS = 70
TOP_M = 60
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
    + "".join(f'<Choice value="{c}"/>' for c in CLASSES)
    + "</Choices></View>"
)


def cifar_images() -> list[tuple[str, str, bytes]]:
    """(file name, class, JPEG bytes) of the first PER_CLASS test images of each class."""
    archive = data_file(CIFAR10_ARCHIVE)
    out: list[tuple[str, str, bytes]] = []
    counts = dict.fromkeys(CLASSES, 0)
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 3 and parts[0] == "test" and parts[1] in counts and counts[parts[1]] < PER_CLASS:
                counts[parts[1]] += 1
                out.append((f"{parts[1]}-{parts[2]}", parts[1], tar.extractfile(member).read()))
            if all(v == PER_CLASS for v in counts.values()):
                break
    return out


class Stack:
    """The backend and its worker, restartable, with the test's view of Label Studio."""

    def __init__(self, ls: Any, tmp: Path) -> None:
        self.ls = ls
        self.tmp = tmp
        self.model_dir = tmp / "models"
        prefix = f"isal-e2e-{uuid.uuid4().hex[:8]}"
        self.env = backend_env(self.model_dir, "redis://127.0.0.1:6379/0", {
            # No LABEL_STUDIO_URL/_API_KEY: host and token come from /setup, verified with Label Studio
            "ISAL_WRITE_TOP_M": str(TOP_M),
            "ISAL_WRITE_MIN": str(TOP_M),  # every round writes exactly the top M (the adaptive size's floor)
            "ISAL_REDIS_PREFIX": prefix,
            "RQ_QUEUE": prefix,
            "ISAL_RETRY_BACKOFF": "2,5,10",
            "ISAL_SHARD_SIZE": "40",  # the first round's 210 images go to 6 feature shards
        })
        self.prefix = prefix
        self.backend: Service | None = None
        self.workers: list[Service] = []

    def start(self, port: int | None = None) -> None:
        self.backend = start_backend(self.env, self.tmp / "backend.log", port=port)
        self.workers = [start_worker(self.env, self.tmp / f"worker{i}.log") for i in range(2)]

    def stop(self) -> None:
        for service in [*self.workers, self.backend]:
            if service is not None:
                service.stop()

    def close(self) -> None:
        """Stop the processes and remove this stack's keys from the shared Redis."""
        self.stop()
        r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        for key in [*r.scan_iter(f"{self.prefix}*"), *r.scan_iter(f"rq:*{self.prefix}*")]:
            r.delete(key)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        r = requests.request(method, f"{self.ls.url}{path}", headers=self.ls.legacy_headers, timeout=60, **kwargs)
        assert r.status_code < 300, f"{method} {path}: HTTP {r.status_code} {r.text[:300]}"
        return r.json() if r.content else None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.tmp.glob("*.log")))


@pytest.fixture(scope="module", params=DATABASES)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack against Label Studio on SQLite, then on PostgreSQL (as it runs in production)."""
    s = Stack(label_studio_on(request, request.param), tmp_path_factory.mktemp(f"e2e-{request.param}"))
    s.start()
    try:
        yield s
    finally:
        s.close()


def wait_for_round(stack: Stack, project: int, done: Any, timeout_s: float = 300) -> dict[str, Any]:
    """Poll until the project's queue is idle and the current round's report satisfies ``done``.

    Events that arrive while a round runs leave one round waiting, which runs again on the same state:
    waiting for idle makes the round under test the last one.
    """
    store = ModelStore(stack.model_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queue = requests.get(f"{stack.backend.url}/status/{project}", timeout=30).json()["queue"]
        idle = queue["running"] is None and not any(queue["waiting"].values())
        state = store.load(project)
        if idle and state is not None and done(state.report):
            return state.report
        time.sleep(1)
    raise AssertionError(f"no round satisfying the condition within {timeout_s} s; logs:\n{stack.logs()}")


def next_task(ls: Any, project: int, token: str) -> int:
    r = requests.get(f"{ls.url}/api/projects/{project}/next", headers={"Authorization": f"Token {token}"},
                     timeout=60)
    assert r.status_code == 200, r.text[:300]
    return r.json()["id"]


def test_the_labeling_stream_follows_isal_end_to_end(stack: Stack) -> None:
    ls = stack.ls
    project = stack.api("POST", "/api/projects", json={"title": "isal e2e", "label_config": LABEL_CONFIG})["id"]
    sqlite_file = Path(ls.db_env["LABEL_STUDIO_BASE_DATA_DIR"]) / "label_studio.sqlite3"
    if ls.database == "postgres":  # Label Studio keeps its data in PostgreSQL, not in a SQLite file beside it
        rows = Postgres.from_env().query(ls.db_env["POSTGRE_NAME"], f"SELECT title FROM project WHERE id = {project}")
        assert rows == ["isal e2e"] and not sqlite_file.exists()
    else:
        assert sqlite_file.exists()
    images = cifar_images()
    for start in range(0, len(images), 50):  # Django refuses more than 100 files in one request
        # one form field per file: Label Studio keeps only one file per field name
        batch = images[start : start + 50]
        files = [(f"file{i}", (name, data, "image/jpeg")) for i, (name, _, data) in enumerate(batch)]
        stack.api("POST", f"/api/projects/{project}/import", files=files)
    tasks = stack.api("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]
    assert len(tasks) == len(images) >= 200
    # Label Studio stores an upload as "<8 hex>-<original name>"; ours are "<class>-<file>".
    truth = {t["id"]: t["data"]["image"].rsplit("/", 1)[-1].split("-")[1] for t in tasks}
    assert sorted(set(truth.values())) == sorted(CLASSES)

    ml = stack.api("POST", "/api/ml", json={"url": stack.backend.url, "project": project, "title": "isal"})
    assert ml["id"]

    # Cold start: connecting (/setup) starts the first round before any annotation; it orders the stream for
    # diversity (core-set), and its images are featurized in shards shared by the two workers.
    cold = wait_for_round(stack, project, lambda r: r.get("labeled") == 0)
    assert cold["order"].startswith("cold-start"), cold["order"]
    assert cold["written"] == TOP_M and cold["unlabeled"] == len(images)
    assert cold["shards"]["count"] == 6 and len(cold["shards"]["computed_by"]) == 6
    cold_predictions = [p for p in stack.api("GET", "/api/predictions", params={"project": project})
                        if p["model_version"] == cold["round_id"]]
    assert [p["task"] for p in sorted(cold_predictions, key=lambda p: p["score"])][:20] == cold["top_tasks"]

    # Annotate 8 tasks per class, as an annotator would.
    annotated: list[int] = []
    for cls in CLASSES:
        for task_id in [t for t, c in truth.items() if c == cls][:8]:
            stack.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": [
                {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [cls]}}]})
            annotated.append(task_id)
    report = wait_for_round(stack, project, lambda r: r.get("labeled") == 24)
    round_id = report["round_id"]
    assert report["order"].startswith("isal:"), report["order"]
    assert report["unlabeled"] == len(images) - 24 and report["written"] == TOP_M
    assert report["validation_accuracy"] > 0.5  # pretrained features separate these classes

    # The M most valuable unlabeled tasks hold a prediction of that round, and only they.
    predictions = stack.api("GET", "/api/predictions", params={"project": project})
    ours = [p for p in predictions if p["model_version"] == round_id]
    assert len(ours) == TOP_M
    assert {p["task"] for p in ours}.isdisjoint(annotated)
    by_score = [p["task"] for p in sorted(ours, key=lambda p: p["score"])]
    assert by_score[:20] == report["top_tasks"]
    assert all(p["result"][0]["value"]["choices"][0] in CLASSES for p in ours)
    project_state = stack.api("GET", f"/api/projects/{project}")
    assert project_state["sampling"] == "Uncertainty sampling" and project_state["model_version"] == round_id

    # The stream: most valuable first, the "Label All Tasks" action agrees, a second annotator gets the next.
    assert next_task(ls, project, ls.token) == by_score[0]
    r = requests.post(f"{ls.url}/api/dm/actions", params={"id": "next_task", "project": project},
                      json={"project": project}, headers=ls.legacy_headers, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == by_score[0]
    second = create_annotator(ls, "annotator2@example.com")
    assert next_task(ls, project, second) == by_score[1]
    third = create_annotator(ls, "annotator3@example.com")
    assert next_task(ls, project, third) == by_score[2]

    # /predict for a task without predictions: the current model's pre-label with an ISAL-derived score.
    unlabeled = next(t for t in tasks if t["id"] not in annotated and t["id"] not in {p["task"] for p in ours})
    full_task = stack.api("GET", f"/api/tasks/{unlabeled['id']}")
    answer = requests.post(f"{stack.backend.url}/predict", json={"tasks": [full_task], "project": f"{project}.1",
                                                                  "label_config": LABEL_CONFIG}, timeout=120).json()
    assert answer["results"][0]["model_version"] == round_id
    assert 0.0 <= answer["results"][0]["score"] <= 1.0
    assert answer["results"][0]["result"][0]["value"]["choices"][0] in CLASSES

    # New tasks are scored with the current model and stored s_test, without a retrain.
    new_images = [(f"new{i}-{name}", data, "image/jpeg") for i, (name, _, data) in enumerate(images[:3])]
    stack.api("POST", f"/api/projects/{project}/import",
              files=[(f"file{i}", item) for i, item in enumerate(new_images)])
    all_tasks = stack.api("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]
    new_ids = {t["id"] for t in all_tasks} - {t["id"] for t in tasks}
    assert len(new_ids) == 3
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        scored = [p for p in stack.api("GET", "/api/predictions", params={"project": project})
                  if p["task"] in new_ids and p["model_version"] == round_id]
        if len(scored) == 3:
            break
        time.sleep(1)
    assert len(scored) == 3, stack.logs()
    assert all(0.0 <= p["score"] <= 1.0 and p["result"] for p in scored)

    # Deleting an annotation starts a new round on the remaining labels.
    annotation = stack.api("GET", f"/api/tasks/{annotated[0]}/annotations")[0]
    stack.api("DELETE", f"/api/annotations/{annotation['id']}")
    report2 = wait_for_round(stack, project, lambda r: r.get("labeled") == 23)
    assert report2["unlabeled"] == len(images) + 3 - 23
    assert report2["round_id"] != round_id
    assert stack.api("GET", f"/api/projects/{project}")["model_version"] == report2["round_id"]

    # A restarted backend and worker carry on from the stored model.
    port = int(stack.backend.url.rsplit(":", 1)[1])
    stack.stop()
    stack.start(port=port)
    answer = requests.post(f"{stack.backend.url}/predict", json={"tasks": [full_task], "project": f"{project}.1",
                                                                  "label_config": LABEL_CONFIG}, timeout=120).json()
    assert answer["results"][0]["model_version"] == report2["round_id"]
    metrics = requests.get(f"{stack.backend.url}/metrics", timeout=30).text
    assert ls.token not in metrics
    status = json.dumps(requests.get(f"{stack.backend.url}/status/{project}", timeout=30).json())
    assert ls.token not in status
