"""The task mirror against a real Label Studio: what incremental syncs keep equals what a full resync reads,
through every kind of change, and a round's result does not depend on which one fed it."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from isal_backend.labelstudio.client import LabelStudioClient
from isal_backend.labelstudio.datastore import LabelStudioDatastore
from isal_backend.labelstudio.mirror import TaskMirror, normalize, request_resync
from isal_backend.round import Round
from isal_backend.settings import Settings
from isal_backend.store import ModelStore

pytestmark = pytest.mark.e2e

CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="red"/><Choice value="blue"/></Choices></View>')


def data_url(i: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (200, 20, 20) if i % 2 else (20, 20, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


class Project:
    def __init__(self, ls: Any, n: int) -> None:
        self.ls, self.api = ls, ls.url + "/api"
        self.id = self.call("POST", "/projects", json={"title": f"mirror {time.time()}", "label_config": CONFIG})["id"]
        self.call("POST", f"/projects/{self.id}/import", json=[{"image": data_url(i)} for i in range(n)])
        self.ids = sorted(t["id"] for t in self.call("GET", "/tasks", params={"project": self.id,
                                                                              "page_size": 1000})["tasks"])

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = requests.request(method, self.api + path, headers=self.ls.legacy_headers, timeout=60, **kwargs)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:300]}"
        return r.json() if r.content else None

    def annotate(self, task: int, label: str | None = None, skip: bool = False) -> int:
        body = {"result": [] if skip else choice(label or "red"), "was_cancelled": skip}
        return self.call("POST", f"/tasks/{task}/annotations", json=body)["id"]


def full_read(client: LabelStudioClient, project: int) -> list[dict[str, Any]]:
    return [normalize(t) for t in client.list_tasks(project)]


def test_incremental_syncs_keep_what_a_full_resync_reads(label_studio: Any, tmp_path: Path) -> None:
    project = Project(label_studio, 30)
    client = LabelStudioClient(label_studio.url, label_studio.token)
    mirror = TaskMirror(tmp_path / "mirror.sqlite3")
    store = LabelStudioDatastore(client, project.id, mirror)

    def check(change: str) -> dict[str, Any]:
        fresh = LabelStudioDatastore(client, project.id, mirror)  # a datastore serves one round
        tasks = fresh.tasks()
        assert tasks == full_read(client, project.id), change
        return fresh.fetch_report()

    assert store.tasks() == full_read(client, project.id) and store.fetch_report()["mode"] == "full"
    ids = project.ids
    first = project.annotate(ids[0], "red")
    time.sleep(1.1)  # Label Studio's clock moves on between changes, as an annotator's does
    report = check("an annotation")
    assert report["mode"] == "incremental" and report["with_annotations"] >= 1 and "count_check" not in report
    project.call("PATCH", f"/annotations/{first}", json={"result": choice("blue")})
    check("an updated annotation")
    project.annotate(ids[1], skip=True)
    check("a skipped task")
    second = project.annotate(ids[2], "red")
    project.annotate(ids[2], "blue")  # a second annotation of the same task
    check("two annotations of a task")
    project.call("DELETE", f"/annotations/{second}")
    check("a deleted annotation")
    project.call("POST", f"/projects/{project.id}/import", json=[{"image": data_url(100 + i)} for i in range(4)])
    check("imported tasks")
    project.call("POST", f"/projects/{project.id}/import",
                 json=[{"data": {"image": data_url(200)}, "annotations": [{"result": choice("red")}]}])
    check("a task imported with its annotation")
    project.call("DELETE", f"/tasks/{ids[5]}")
    report = check("a deleted task")
    assert report["count_check"] == "mismatch" and report["deleted"] == 1
    # The mirror is on disk: another process (here: another object) reads the same tasks without Label Studio.
    assert TaskMirror(tmp_path / "mirror.sqlite3").tasks() == full_read(client, project.id)
    # A requested resync ("Start training") rereads everything.
    request_resync(tmp_path)
    resynced = LabelStudioDatastore(client, project.id, mirror)
    assert resynced.tasks() == full_read(client, project.id)
    annotations = sum(len(t["annotations"]) for t in full_read(client, project.id))
    assert resynced.fetch_report() | {"seconds": 0} == {"mode": "full", "reason": "requested", "tasks": 34,
                                                        "annotations": annotations, "seconds": 0}


def test_a_round_gives_the_same_result_from_the_mirror_and_from_a_full_read(label_studio: Any, tmp_path: Path) -> None:
    project = Project(label_studio, 24)
    for i, task in enumerate(project.ids[:10]):
        project.annotate(task, "red" if i % 2 else "blue")
    client = LabelStudioClient(label_studio.url, label_studio.token)
    mirror = TaskMirror(tmp_path / "mirror.sqlite3")
    LabelStudioDatastore(client, project.id, mirror).tasks()  # the mirror exists ...
    time.sleep(1.1)
    project.annotate(project.ids[10], "red")  # ... and this annotation reaches it incrementally
    project.annotate(project.ids[11], skip=True)
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
                        model_dir=tmp_path, backbone="small-cnn", feature_dim=8)
    incremental_store = LabelStudioDatastore(client, project.id, mirror)
    incremental = Round(project.id, incremental_store, ModelStore(tmp_path / "a"), settings).run()
    full = Round(project.id, LabelStudioDatastore(client, project.id), ModelStore(tmp_path / "b"), settings).run()
    assert incremental["fetch"]["mode"] == "incremental" and full["fetch"]["mode"] == "full"
    for key in ("labeled", "unlabeled", "top_tasks", "skipped", "order", "validation_accuracy"):
        assert incremental[key] == full[key], key


class StaleCounters:
    """The real client, but the change query answers each task's annotation counters as 0, as Label Studio
    1.23.2 did in ``bench live`` for a task labeled while a round read it (its ``updated_at`` had moved)."""

    def __init__(self, client: LabelStudioClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def tasks_updated_since(self, project_id: int, since: str) -> list[dict[str, Any]]:
        return [{**r, "total_annotations": 0, "cancelled_annotations": 0}
                for r in self.client.tasks_updated_since(project_id, since)]


def test_a_label_the_counters_do_not_show_yet_is_still_mirrored(label_studio: Any, tmp_path: Path) -> None:
    """A known task that changed is read with its annotations whatever its counters say; a new task the
    counters hide is found by the annotation count check (Label Studio counts its annotation table)."""
    project = Project(label_studio, 12)
    client = LabelStudioClient(label_studio.url, label_studio.token)
    stale = StaleCounters(client)
    mirror = TaskMirror(tmp_path / "mirror.sqlite3")
    LabelStudioDatastore(client, project.id, mirror).tasks()
    time.sleep(1.1)
    project.annotate(project.ids[0], "red")
    project.annotate(project.ids[1], skip=True)
    known = LabelStudioDatastore(stale, project.id, mirror)  # type: ignore[arg-type]
    assert known.tasks() == full_read(client, project.id)
    assert known.fetch_report()["with_annotations"] >= 2 and "annotation_check" not in known.fetch_report()

    time.sleep(1.1)
    project.call("POST", f"/projects/{project.id}/import",
                 json=[{"data": {"image": data_url(300)}, "annotations": [{"result": choice("blue")}]}])
    hidden = LabelStudioDatastore(stale, project.id, mirror)  # type: ignore[arg-type]
    assert hidden.tasks() == full_read(client, project.id)
    report = hidden.fetch_report()
    assert report["mode"] == "incremental" and report["annotations"] == 3
    assert report["annotation_check"]["label_studio"] == 3 and report["annotation_check"]["mirror"] == 2
    assert report["annotation_check"]["after"] == 3
