"""Issue 9 item 5, skips and edits, against a real Label Studio, each through real rounds (no mocks).

A skipped task (a cancelled annotation) is no training label and leaves the stream; an edited annotation
replaces its old label, also when the mirror syncs incrementally; of several annotations the latest wins.
Rounds run as the job runs them (:func:`~isal_backend.jobs.entry.live_datastore`, the project's mirror).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests

from isal_backend.jobs.entry import live_datastore, task_parts
from isal_backend.labelstudio.convert import CANCELLED
from isal_backend.round import Round
from isal_backend.settings import Settings
from isal_backend.store import ModelStore
from tests.test_e2e_classification import create_annotator
from tests.test_labelstudio_mirror import Project, choice

pytestmark = pytest.mark.e2e


class Rounds:
    """Rounds of one project as the job runs them; each returns its report and the labels it trained on."""

    def __init__(self, ls: Any, project: Project, model_dir: Path) -> None:
        self.project = project
        self.settings = Settings(label_studio_url=ls.url, label_studio_api_key=ls.token, model_dir=model_dir,
                                 backbone="small-cnn", feature_dim=8)
        self.store = ModelStore(model_dir)

    def run(self) -> tuple[dict[str, Any], dict[int, str]]:
        datastore = live_datastore(self.settings, self.project.id)
        round_ = Round(self.project.id, datastore, self.store, self.settings,
                       task_parts(self.settings, self.store, self.project.id), write_size=0)  # every pool task
        report = round_.run()
        assert report.get("committed", True) and report["model_version"]
        # The labels as the round's task kind split them, from the very mirror rows the round read.
        task = round_.task()
        assert datastore.mirror is not None
        labels = {int(t["id"]): task.labels[y] for t, y in task.split(datastore.mirror.tasks()).labeled}
        assert len(labels) == report["labeled"]
        assert report["classes"]["labeled"] == {name: list(labels.values()).count(name) for name in task.labels}
        return report, labels

    def predictions(self, task: int, model_version: str) -> list[dict[str, Any]]:
        """Label Studio's predictions of ``task`` by ``model_version``."""
        rows = self.project.call("GET", "/predictions", params={"task": task})
        return [p for p in rows if p["task"] == task and p["model_version"] == model_version]


def test_a_skipped_task_is_no_label_and_leaves_the_stream(label_studio: Any, tmp_path: Path) -> None:
    project = Project(label_studio, 12)
    rounds = Rounds(label_studio, project, tmp_path)
    ids = project.ids
    for i, task in enumerate(ids[:4]):
        project.annotate(task, "red" if i % 2 else "blue")
    skipped = ids[4]
    first, _ = rounds.run()
    assert first["fetch"]["mode"] == "full" and first["labeled"] == 4 and first["unlabeled"] == 8
    assert len(rounds.predictions(skipped, first["model_version"])) == 1  # in the stream before the skip

    time.sleep(1.1)  # Label Studio's clock moves on, as an annotator's does
    # Another annotator skips it: Label Studio itself would serve it to the admin again (its default skip queue,
    # REQUEUE_FOR_OTHERS), so keeping it out of the admin's /next below is the round's doing.
    annotator = create_annotator(label_studio, f"skipper-{time.time()}@example.com")
    r = requests.post(f"{label_studio.url}/api/tasks/{skipped}/annotations", timeout=60,
                      headers={"Authorization": f"Token {annotator}"}, json={"result": [], "was_cancelled": True})
    assert r.status_code == 201, r.text[:300]
    skip = r.json()["id"]
    report, labels = rounds.run()
    assert report["fetch"]["mode"] == "incremental"
    assert skipped not in labels and report["labeled"] == 4 and sum(report["classes"]["labeled"].values()) == 4
    assert {"task": skipped, "reason": CANCELLED} in report["skipped"]
    assert report["unlabeled"] == 7 and report["written"] == 7 and skipped not in report["top_tasks"]
    assert rounds.predictions(skipped, report["model_version"]) == []
    assert all(len(rounds.predictions(t, report["model_version"])) == 1 for t in ids[5:])

    served = []
    for _ in range(4):  # the admin labels what /next serves: never the skipped task, always a scored one
        task = project.call("GET", f"/projects/{project.id}/next")
        served.append(task["id"])
        assert [p["model_version"] for p in task["predictions"]] == [report["model_version"]]
        project.annotate(task["id"], "red")
    assert skipped not in served and set(served) <= set(ids[5:])
    assert served == report["top_tasks"][:4]  # the round's order, the skipped task out of it

    # Labeled after all (the skip edited into an answer, as LS does when a skipped task is submitted): a label.
    time.sleep(1.1)
    project.call("PATCH", f"/annotations/{skip}", json={"result": choice("blue"), "was_cancelled": False})
    last, labels = rounds.run()
    assert last["fetch"]["mode"] == "incremental" and labels[skipped] == "blue" and last["labeled"] == 9
    assert all(s["task"] != skipped for s in last["skipped"]) and last["skipped"] == []


def test_an_edited_annotation_replaces_its_label(label_studio: Any, tmp_path: Path) -> None:
    project = Project(label_studio, 12)
    rounds = Rounds(label_studio, project, tmp_path)
    ids = project.ids
    for i, task in enumerate(ids[:6]):
        project.annotate(task, "red" if i % 2 else "blue")  # 3 red, 3 blue
    edited = ids[6]
    annotation = project.annotate(edited, "red")
    first, labels = rounds.run()
    assert labels[edited] == "red" and first["classes"]["labeled"] == {"red": 4, "blue": 3}

    time.sleep(1.1)
    project.call("PATCH", f"/annotations/{annotation}", json={"result": choice("blue")})
    second, labels = rounds.run()
    assert second["fetch"]["mode"] == "incremental" and second["fetch"]["with_annotations"] >= 1
    assert labels[edited] == "blue" and second["labeled"] == 7  # replaced, not added
    assert second["classes"]["labeled"] == {"red": 3, "blue": 4}
    assert edited not in second["top_tasks"] and rounds.predictions(edited, second["model_version"]) == []


def test_of_several_annotations_the_latest_is_the_label(label_studio: Any, tmp_path: Path) -> None:
    project = Project(label_studio, 12)
    rounds = Rounds(label_studio, project, tmp_path)
    ids = project.ids
    for i, task in enumerate(ids[:4]):
        project.annotate(task, "red" if i % 2 else "blue")
    twice = ids[4]
    older = project.annotate(twice, "red")
    time.sleep(1.1)
    newer = project.annotate(twice, "blue")  # a second annotation of the same task, later
    first, labels = rounds.run()
    assert labels[twice] == "blue" and first["labeled"] == 5  # one label for the task, the latest
    assert first["classes"]["labeled"] == {"red": 2, "blue": 3}

    time.sleep(1.1)
    project.call("PATCH", f"/annotations/{older}", json={"result": choice("red")})  # the older one, edited last
    stamps = {a["id"]: a["updated_at"] for a in project.call("GET", f"/tasks/{twice}/annotations")}
    assert set(stamps) == {older, newer} and stamps[older] > stamps[newer]  # Label Studio agrees it is the latest
    second, labels = rounds.run()
    assert second["fetch"]["mode"] == "incremental"
    assert labels[twice] == "red" and second["labeled"] == 5
    assert second["classes"]["labeled"] == {"red": 3, "blue": 2}
