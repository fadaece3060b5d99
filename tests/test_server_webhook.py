"""/webhook validation against every real Label Studio body, and malformed bodies -> 400 with a message."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from isal_backend.server import create_app
from isal_backend.server.webhook import parse_webhook
from isal_backend.settings import Settings

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "label-studio-samples"
EXPECTED = {  # action -> (HTTP status, job kinds enqueued)
    "ANNOTATION_CREATED": (201, ["round"]),
    "ANNOTATION_UPDATED": (201, ["round"]),
    "ANNOTATIONS_DELETED": (201, ["round"]),
    "START_TRAINING": (201, ["round"]),
    "TASKS_CREATED": (201, ["round"]),  # no round yet: the cold-start round orders the import
    "PROJECT_UPDATED": (200, []),
}


def sample(name: str) -> dict:
    return json.loads((SAMPLES / f"ml_webhook_{name}.json").read_text())["request_body"]


@pytest.fixture
def client(tmp_path):
    settings = Settings(model_dir=tmp_path, round_job="tests.jobs_for_tests.noop_round",
                        score_job="tests.jobs_for_tests.noop_scoring")
    app = create_app(settings)
    yield app.test_client()
    app.config["ISAL_STATE"].coalescer.close()


@pytest.mark.parametrize("action", sorted(EXPECTED))
def test_every_real_label_studio_body_is_accepted(client, action):
    body = sample(action)
    r = client.post("/webhook", json=body)
    status, kinds = EXPECTED[action]
    assert r.status_code == status, r.get_json()
    data = r.get_json()
    assert data["action"] == action and data["project"] == 1
    assert [j["kind"] for j in data.get("jobs", [])] == kinds
    if kinds:
        assert data["job_id"].startswith(f"{kinds[0]}-1-") and len(data["job_id"]) > 32


def test_second_event_is_absorbed_by_the_waiting_job(client):
    # the noop job may already have started; either way the reply names one job per state
    first = client.post("/webhook", json=sample("ANNOTATION_CREATED")).get_json()
    second = client.post("/webhook", json=sample("ANNOTATION_UPDATED")).get_json()
    assert first["status"] == "enqueued"
    assert second["status"] in ("absorbed", "enqueued")
    if second["status"] == "absorbed":
        assert second["job_id"] == first["job_id"]


def _committed_round(client, project: int = 1) -> None:
    """What the model store holds once a round was committed (the server reads only ``CURRENT``)."""
    folder = client.application.config["ISAL_STATE"].settings.model_dir / "projects" / str(project)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "CURRENT").write_text("isal-20260101T000000000000-abcdef\n")


def test_tasks_imported_with_annotations_also_retrain(client):
    _committed_round(client)
    body = sample("TASKS_CREATED")
    body["tasks"][0]["total_annotations"] = 1
    data = client.post("/webhook", json=body).get_json()
    assert sorted(j["kind"] for j in data["jobs"]) == ["round", "score"]


def test_imported_tasks_are_scored_once_a_round_exists_and_start_the_first_round_before(client):
    before = client.post("/webhook", json=sample("TASKS_CREATED")).get_json()
    assert [j["kind"] for j in before["jobs"]] == ["round"]  # nothing to score against: order them cold
    labeled = sample("TASKS_CREATED")
    labeled["tasks"][0]["total_annotations"] = 1
    assert [j["kind"] for j in client.post("/webhook", json=labeled).get_json()["jobs"]] == ["round"]
    _committed_round(client)
    after = client.post("/webhook", json=sample("TASKS_CREATED")).get_json()
    assert [j["kind"] for j in after["jobs"]] == ["score"]  # today's behaviour: no retrain for new tasks


def _mutate(name: str, fn) -> dict:
    body = copy.deepcopy(sample(name))
    fn(body)
    return body


BAD = [
    ("not json", b"{not json", "not valid JSON"),
    ("json list", b"[1, 2]", "JSON object"),
    ("no action", json.dumps({"project": {"id": 1}}).encode(), "'action'"),
    ("unknown action", json.dumps({"action": "ANNOTATION_DELETED", "project": {"id": 1}}).encode(), "unknown action"),
    ("action not str", json.dumps({"action": 5, "project": {"id": 1}}).encode(), "'action'"),
]


@pytest.mark.parametrize(("label", "raw", "needle"), BAD, ids=[b[0] for b in BAD])
def test_malformed_bodies_are_400_with_a_message(client, label, raw, needle):
    r = client.post("/webhook", data=raw, content_type="application/json")
    assert r.status_code == 400
    assert needle in r.get_json()["error"]


BAD_FIELDS = [
    ("ANNOTATION_CREATED", lambda b: b.pop("project"), "'project'"),
    ("ANNOTATION_CREATED", lambda b: b["project"].update(id="1"), "positive integer"),
    ("ANNOTATION_CREATED", lambda b: b["project"].update(id=True), "positive integer"),
    ("ANNOTATION_CREATED", lambda b: b["project"].update(id=0), "positive integer"),
    ("ANNOTATION_CREATED", lambda b: b.pop("annotation"), "'annotation'"),
    ("ANNOTATION_UPDATED", lambda b: b["annotation"].update(id=None), "annotation"),
    ("ANNOTATION_UPDATED", lambda b: b.pop("task"), "'task'"),
    ("ANNOTATION_CREATED", lambda b: b["annotation"].update(project=2), "differs"),
    ("ANNOTATION_CREATED", lambda b: b["annotation"].update(task=99), "differs"),
    ("ANNOTATIONS_DELETED", lambda b: b.pop("annotations"), "'annotations'"),
    ("ANNOTATIONS_DELETED", lambda b: b.update(annotations=[]), "non-empty"),
    ("ANNOTATIONS_DELETED", lambda b: b.update(annotations=[7]), "annotations[0]"),
    ("TASKS_CREATED", lambda b: b.update(tasks={"id": 1}), "'tasks'"),
    ("TASKS_CREATED", lambda b: b["tasks"][0].update(id="x"), "tasks[0]"),
    ("START_TRAINING", lambda b: b.update(project=1), "'project'"),
    ("PROJECT_UPDATED", lambda b: b.update(project=None), "'project'"),
]


@pytest.mark.parametrize(("action", "mutate", "needle"), BAD_FIELDS)
def test_missing_or_wrong_fields_are_400_naming_the_field(client, action, mutate, needle):
    r = client.post("/webhook", json=_mutate(action, mutate))
    assert r.status_code == 400, r.get_json()
    assert needle in r.get_json()["error"]
    assert action in r.get_json()["error"] or needle == "'project'"


def test_wrong_method_and_unknown_route_answer_json(client):
    assert client.get("/webhook").status_code == 405
    r = client.get("/no-such-route")
    assert r.status_code == 404 and "error" in r.get_json()
    r = client.post("/train", json={})
    assert r.status_code == 410 and "START_TRAINING" in r.get_json()["error"]


def test_deleted_tasks_lead_to_a_retrain() -> None:
    """Deleted tasks may have carried labels, and the stream must stop serving them."""
    event = parse_webhook({"action": "TASKS_DELETED", "project": {"id": 3}})
    assert event.retrain and event.project_id == 3


def test_annotator_events_are_noted_for_pacing_and_imports_are_not(client):
    """The queue keeps the times of the annotators' own acts (a round's calls wait around them), not imports'."""
    coalescer = client.application.config["ISAL_STATE"].coalescer
    client.post("/webhook", json=sample("TASKS_CREATED"))
    client.post("/webhook", json=sample("START_TRAINING"))
    assert coalescer.activity(1) == []
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"):
        client.post("/webhook", json=sample(action))
    ages = coalescer.activity(1)
    assert len(ages) == 3 and ages == sorted(ages) and 0 <= ages[0] < 5  # newest first
    assert coalescer.activity(2) == []
