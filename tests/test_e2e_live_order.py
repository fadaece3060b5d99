"""Issue 9 against a real Label Studio 1.23.2, the backend under gunicorn and an RQ worker on real Redis.

1. **Ordered from the first task**: connecting the backend and importing tasks start the cold-start
   round before any annotation, so the first task ``/next`` serves is the cold-start order's first (not
   the lowest task id), with the round's prediction. Both orders of the two steps: connect then import
   (TASKS_CREATED starts it), import then connect (/setup starts it).
2. **Never keep Label Studio waiting**: over rounds with annotations in between, the predictions the
   project holds stay within two rounds' worth, each round writes what annotators can reach (the
   adaptive size), and the stream still serves the round's best task first with its pre-label, the
   second one to a second annotator.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests

from isal_backend.bench.datasets import png_bytes
from isal_backend.tasks.base import round_seed
from tests.test_e2e_classification import Stack, create_annotator, next_task, wait_for_round

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

CLASSES = ("red", "green", "blue")
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
                + "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>")
WRITE_MIN = 10
WRITE_CAP = 40


def colour_tasks(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` noisy 24x24 images as data URLs, the dominant channel their class (i % 3)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 90, size=(24, 24, 3), dtype=np.uint8)
        pixels[..., i % 3] += rng.integers(100, 160, dtype=np.uint8)
        out.append({"image": "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode(),
                    "truth": CLASSES[i % 3]})
    return out


@pytest.fixture(scope="module")
def stack(label_studio: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(label_studio, tmp_path_factory.mktemp("e2e-live-order"))
    s.env.update({"ISAL_BACKBONE": "small-cnn", "ISAL_FEATURE_DIM": "16", "ISAL_WRITE_TOP_M": str(WRITE_CAP),
                  "ISAL_WRITE_MIN": str(WRITE_MIN), "ISAL_SHARD_SIZE": "2000",
                  # core-set: its first pick is known beforehand, so the test can make sure it is not the lowest id
                  "ISAL_COLD_START": "coreset"})
    s.start()
    try:
        yield s
    finally:
        s.close()


def new_project(stack: Stack, title: str, pool: int) -> int:
    """A project whose cold-start order does not begin at its lowest task id.

    The core-set's first pick is a seeded random pool position (``round_seed(project, 0)``), position 0
    being the lowest id: a project where it would be 0 is replaced by the next one.
    """
    while True:
        project = stack.api("POST", "/api/projects", json={"title": title, "label_config": LABEL_CONFIG})["id"]
        if int(np.random.default_rng(round_seed(project, 0)).integers(pool)) != 0:
            return project
        stack.api("DELETE", f"/api/projects/{project}")


def connect(stack: Stack, project: int) -> None:
    ml = stack.api("POST", "/api/ml", json={"url": stack.backend.url, "project": project, "title": "isal"})
    assert ml["id"]


def served(stack: Stack, project: int, token: str) -> dict[str, Any]:
    r = requests.get(f"{stack.ls.url}/api/projects/{project}/next", headers={"Authorization": f"Token {token}"},
                     timeout=60)
    assert r.status_code == 200, r.text[:300]
    return r.json()


def predictions(stack: Stack, project: int) -> list[dict[str, Any]]:
    return stack.api("GET", "/api/predictions/", params={"project": project})


def test_connect_then_import_serves_the_cold_start_order_first(stack: Stack) -> None:
    pool = 30
    project = new_project(stack, "live order: connect first", pool)
    connect(stack, project)  # /setup: no task yet, so its round commits nothing and the import's starts one
    stack.api("POST", f"/api/projects/{project}/import", json=colour_tasks(pool, seed=1))
    ids = sorted(t["id"] for t in stack.api("GET", "/api/tasks", params={"project": project, "page_size": 100,
                                                                          "include": "id"})["tasks"])
    assert len(ids) == pool
    report = wait_for_round(stack, project, lambda r: r.get("labeled") == 0 and r.get("unlabeled") == pool)
    assert report["order"] == "cold-start: core-set diversity", report["order"]
    assert report["write_size"] == WRITE_MIN and report["written"] == WRITE_MIN  # no rate yet: the floor
    assert "ISAL_WRITE_MIN" in report["write_size_reason"]

    first = served(stack, project, stack.ls.token)  # no annotation was ever made in this project
    assert first["id"] == report["top_tasks"][0] != ids[0]
    assert [p["model_version"] for p in first["predictions"]] == [report["round_id"]]
    assert stack.api("GET", f"/api/projects/{project}")["model_version"] == report["round_id"]


def test_rounds_keep_two_rounds_of_predictions_and_the_stream_its_order(stack: Stack) -> None:
    pool = 60
    project = new_project(stack, "live order: many rounds", pool)
    tasks = colour_tasks(pool, seed=2)
    stack.api("POST", f"/api/projects/{project}/import", json=tasks)
    truth = {t["id"]: t["data"]["truth"]
             for t in stack.api("GET", "/api/tasks", params={"project": project, "page_size": 100})["tasks"]}
    connect(stack, project)  # tasks before the backend: /setup starts the cold-start round
    report = wait_for_round(stack, project, lambda r: r.get("labeled") == 0)
    assert report["order"].startswith("cold-start")

    versions_seen, sizes = [], []
    labeled, previous_written = 0, report["written"]
    for step in range(7):
        # annotate what the stream serves, as an annotator would; one step is a burst of three labels
        for _ in range(3 if step == 3 else 1):
            task = served(stack, project, stack.ls.token)
            stack.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [
                {"from_name": "label", "to_name": "image", "type": "choices",
                 "value": {"choices": [truth[task["id"]]]}}]})
            labeled += 1
        report = wait_for_round(stack, project, lambda r, n=labeled: r.get("labeled") == n)
        versions_seen.append(report["round_id"])
        sizes.append(report["write_size"])
        assert WRITE_MIN <= report["write_size"] <= WRITE_CAP and report["written"] == report["write_size"]
        held = predictions(stack, project)
        # this round's and at most the previous one's (left when a newer round waited, as in the burst)
        assert len(held) <= report["written"] + previous_written <= 2 * WRITE_CAP, (step, len(held), report)
        previous_written = report["written"]
        cleaned = requests.get(f"{stack.backend.url}/status/{project}", timeout=30).json()["last_round"].get("clean_up")
        print(f"\nround {step}: labeled {labeled}, write_size {report['write_size']} ({report['write_size_reason']}), "
              f"held {len(held)}, clean-up {cleaned}")
        assert report["round_id"] in {p["model_version"] for p in held}
        assert len({p["model_version"] for p in held}) <= 2

    assert len(set(versions_seen)) == 7  # a new round after every step
    assert report["order"].startswith("isal:"), report["order"]
    status = requests.get(f"{stack.backend.url}/status/{project}", timeout=30).json()
    assert status["last_round"]["clean_up"]["longest_call_seconds"] >= 0  # the clean-up reports its calls

    first = served(stack, project, stack.ls.token)
    assert first["id"] == report["top_tasks"][0]
    ours = [p for p in first["predictions"] if p["model_version"] == report["round_id"]]
    assert len(ours) == 1 and ours[0]["result"][0]["value"]["choices"][0] in CLASSES  # the pre-label
    second = create_annotator(stack.ls, "live-order-2@example.com")
    assert next_task(stack.ls, project, second) == report["top_tasks"][1]
