"""The dashboard, ``status`` and the round history on rounds the backend's own round made.

The rounds run on the offline datastore (real images, the real round, cold start then ISAL); the pages are
served by the real app (Flask's test client, basic auth on), the command runs as a subprocess. Every image
URL is presigned (its signature in the query string): none may reach a page, a plot or the terminal.
The same against a real Label Studio, and in a real browser: ``test_dashboard_e2e.py``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from isal_backend.bench.datasets import label_config
from isal_backend.bench.offline import OfflineDatastore
from isal_backend.history import HistoryReader, append, freshness, history_path
from isal_backend.labelstudio.config import ClassificationConfig
from isal_backend.labelstudio.convert import prediction_result
from isal_backend.round import Round
from isal_backend.server import create_app
from isal_backend.settings import Settings
from isal_backend.store import ModelStore
from isal_backend.summary import redact
from tests.dashboard_page import Page, curve_points
from tests.test_round_offline import colour_image

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["red", "green", "blue"]
CONFIG = ClassificationConfig("image", "image", "label", CLASSES)
PROJECT = 4
SIGNATURE = "c0ffee5ec2e7"  # part of every image URL's X-Amz-Signature
USER, PASSWORD = "viewer", "dash:pass-XYZ"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def signed(i: int) -> str:
    """A presigned S3 URL, as Label Studio hands out for cloud storage: the secret is in the query."""
    return (f"https://bucket.s3.example.com/pets/img-{i}.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential=AKIAEXAMPLE%2F20261201&X-Amz-Signature={SIGNATURE}{i:04d}")


class SignedProject:
    """60 tasks whose images sit behind presigned URLs; task 61's bytes are not an image."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.truth = {i: i % 3 for i in range(1, 61)}
        self.blobs = {signed(i): colour_image(y, rng) for i, y in self.truth.items()}
        self.blobs[signed(61)] = b"not an image"
        self.datastore = OfflineDatastore(PROJECT, label_config("classification", CLASSES),
                                          {i: signed(i) for i in range(1, 62)}, self.blobs.__getitem__)

    def label(self, task_ids: Any, label: str | None = None) -> None:
        for i in task_ids:
            self.datastore.annotate(i, prediction_result(CONFIG, CLASSES[self.truth[i]]) if label is None else [
                {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}])


def settings(tmp_path: Path, **extra: Any) -> Settings:
    jobs = {"round_job": "tests.jobs_for_tests.noop_round", "score_job": "tests.jobs_for_tests.noop_scoring"}
    return Settings(model_dir=tmp_path, backbone="small-cnn", feature_dim=16, reconcile_seconds=0,
                    **{**jobs, **extra})


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SignedProject, list[dict[str, Any]]]:
    """Seven rounds of one project: a cold start, then six ISAL rounds (more than the store keeps)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    project, store, reports = SignedProject(), ModelStore(tmp), []
    project.label([1, 4])  # one class only: a cold start
    reports.append(Round(PROJECT, project.datastore, store, settings(tmp)).run())
    project.datastore.annotate(40, [], skipped=True)
    project.label([41], label="purple")
    for k in range(6):
        project.label(range(2 + 4 * k, 6 + 4 * k))
        reports.append(Round(PROJECT, project.datastore, store, settings(tmp)).run())
    return tmp, project, reports


@pytest.fixture
def client(rounds: Any) -> Any:
    tmp = rounds[0]
    app = create_app(settings(tmp, basic_auth_user=USER, basic_auth_pass=PASSWORD))
    yield app.test_client()
    app.config["ISAL_STATE"].close()


def test_the_page_shows_every_round_the_stream_and_what_was_skipped(rounds: Any, client: Any) -> None:
    tmp, project, reports = rounds
    assert reports[0]["order"].startswith("cold-start") and all(r["order"].startswith("isal:") for r in reports[1:])
    assert len(ModelStore(tmp).rounds(PROJECT)) == 5  # the store prunes; the history keeps every round

    overview = client.get("/dashboard", headers=AUTH)
    assert overview.status_code == 200 and overview.mimetype == "text/html"
    listed = Page(overview.data.decode()).rows["project"]
    assert [row.attrs["data-project"] for row in listed] == [str(PROJECT)]
    assert f"/dashboard/{PROJECT}" in Page(overview.data.decode()).links

    r = client.get(f"/dashboard/{PROJECT}", headers=AUTH)
    assert r.status_code == 200
    assert "script-src" not in r.headers["Content-Security-Policy"] and "default-src 'none'" in r.headers[
        "Content-Security-Policy"]  # no script may run, none is needed
    page = Page(r.data.decode())
    assert page.refresh == "30"  # idle: a slow self-refresh; while a round runs or waits, every 5 s

    # The curve: one point per round with a model (the cold start has no validation figure), all seven rounds
    # in the timeline, newest first, though the store kept only five.
    points = [row.attrs["data-round"] for row in page.rows["point"]]
    assert points == [r["round_id"] for r in reversed(reports[1:])]
    accuracy = {row.attrs["data-round"]: row.cells[2] for row in page.rows["point"]}
    assert all(accuracy[r["round_id"]] == f"{100 * r['validation_accuracy']:.1f}%" for r in reports[1:])
    assert [row.attrs["data-round"] for row in page.rows["round"]] == [r["round_id"] for r in reversed(reports)]
    assert page.rows["round"][-1].cells[2] == "cold start" and page.rows["round"][0].cells[2] == "isal"
    svg = client.get(f"/dashboard/{PROJECT}/curve.svg", headers=AUTH)
    assert svg.mimetype == "image/svg+xml" and curve_points(svg.data) == len(reports) - 1

    # The next 12 tasks: the stream's own order (the offline datastore serves as Label Studio does), each with
    # its pre-label, score and influence, and a thumbnail made by the round.
    last = reports[-1]
    stream = project.datastore.stream(12)
    assert [int(item.attrs["data-task"]) for item in page.stream] == stream == [h["task"] for h in last["stream_head"]]
    for item, head in zip(page.stream, last["stream_head"], strict=True):
        label = project.datastore.prediction(head["task"])["result"][0]["value"]["choices"][0]
        assert f"pre-label: {label}" in item.text and f"influence {head['key']:.3g}" in item.text
    thumbs = [img["src"] for img in page.images if "thumbnails/" in img["src"]]
    assert len(thumbs) == 12
    for src in thumbs:
        image = client.get(src, headers=AUTH)
        assert image.status_code == 200 and image.mimetype == "image/jpeg"
        assert max(Image.open(io.BytesIO(image.data)).size) <= 96

    # Skipped and failed: exactly the round report's list, with its reasons.
    skipped = {int(row.attrs["data-task"]): row.cells[1] for row in page.rows["skipped"]}
    assert skipped == {s["task"]: s["reason"] for s in last["skipped"]}
    assert "cancelled" in skipped[40] and "not in the label config" in skipped[41]
    assert "could not be loaded" in skipped[61]

    # The plots render; no page or plot names an image URL's signature.
    bodies = [overview.data, r.data] + [client.get(f"/dashboard/{PROJECT}/{name}.svg", headers=AUTH).data
                                        for name in ("curve", "timeline", "classes")]
    for body in bodies:
        assert SIGNATURE.encode() not in body and b"X-Amz-Credential=AKIA" not in body and PASSWORD.encode() not in body
    assert b"X-Amz-Signature=REDACTED" in r.data  # the failed image is named, its signature is not
    assert client.get(f"/dashboard/{PROJECT}?refresh=0", headers=AUTH).data.count(b'http-equiv="refresh"') == 0


def test_every_dashboard_route_needs_basic_auth_and_takes_only_its_own_names(rounds: Any, client: Any) -> None:
    page = Page(client.get(f"/dashboard/{PROJECT}", headers=AUTH).data.decode())
    thumb = next(img["src"] for img in page.images if "thumbnails/" in img["src"])
    for path in ("/dashboard", f"/dashboard/{PROJECT}", f"/dashboard/{PROJECT}/curve.svg", thumb):
        for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"viewer:wrong").decode()}):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Basic"), path
        assert client.get(path, headers=AUTH).status_code == 200
    for path in ("/dashboard/99", "/dashboard/\uff14", "/dashboard/0", f"/dashboard/{PROJECT}/nope.svg",
                 f"/dashboard/{PROJECT}/thumbnails/{'0' * 40}.jpg", f"/dashboard/{PROJECT}/thumbnails/..%2Fhistory.jpg",
                 f"/dashboard/{PROJECT}/thumbnails/credentials.jpg"):
        assert client.get(path, headers=AUTH).status_code == 404, path


def test_while_a_round_runs_the_page_says_so_and_refreshes_every_few_seconds(rounds: Any) -> None:
    tmp = rounds[0]
    # A round job that only takes time: time.sleep(project id), four seconds for project 4.
    app = create_app(settings(tmp, round_job="time.sleep"))
    try:
        client, queue = app.test_client(), app.config["ISAL_STATE"].coalescer
        queue.submit("round", PROJECT)
        deadline = time.monotonic() + 3
        while queue.snapshot()["projects"][PROJECT].get("run_id") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        queue.submit("round", PROJECT)  # arrives while the first runs: it waits
        queue.submit("round", PROJECT)  # absorbed by the waiting one
        html = client.get(f"/dashboard/{PROJECT}").data.decode()
        assert Page(html).refresh == "5" and "running round, round waiting" in html
        assert "<td>events absorbed by a waiting job</td><td class=\"n\">1</td>" in html
        overview = Page(client.get("/dashboard").data.decode())
        assert overview.refresh == "5" and overview.rows["project"][0].cells[9] == "running round, round waiting"
        deadline = time.monotonic() + 30
        while not queue.idle() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queue.idle() and Page(client.get(f"/dashboard/{PROJECT}").data.decode()).refresh == "30"
    finally:
        app.config["ISAL_STATE"].close()


def status(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISAL_", "LABEL_STUDIO_")) and k != "REDIS_URL"}
    return subprocess.run([sys.executable, "-m", "isal_backend", "status", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**env, "MODEL_DIR": str(tmp)})


def test_status_prints_the_same_summary_as_a_table_and_as_json(rounds: Any) -> None:
    tmp, project, reports = rounds
    table = status(tmp)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(str(PROJECT)))
    assert row.split()[:3] == [str(PROJECT), "classification", "isal"] and "cross-validated accuracy" in row
    detail = status(tmp, str(PROJECT))
    assert detail.returncode == 0, detail.stderr
    assert "learning curve (cross-validated accuracy, one point per round)" in detail.stdout
    assert "next 12 tasks of the stream" in detail.stdout and "skipped (3)" in detail.stdout
    as_json = status(tmp, str(PROJECT), "--json")
    data = json.loads(as_json.stdout)
    assert [c["round_id"] for c in data["curve"]] == [r["round_id"] for r in reports[1:]]
    assert data["rounds_total"] == len(reports) and data["order"]["strategy"] == "isal"
    assert [h["task"] for h in data["stream"]["head"]] == project.datastore.stream(12)
    labeled = [i for i in project.datastore.annotated if i not in (40, 41)]  # skipped and off-config
    assert data["classes"]["labeled"] == {c: sum(CLASSES[project.truth[i]] == c for i in labeled) for c in CLASSES}
    assert sum(data["classes"]["pool_predicted"].values()) == reports[-1]["unlabeled"]
    for out in (table.stdout, detail.stdout, as_json.stdout):
        assert SIGNATURE not in out
    unknown = status(tmp, "99")
    assert unknown.returncode == 2 and "project 99 is not known" in unknown.stderr


def test_a_project_with_rounds_but_no_history_gets_them_as_its_first_lines(tmp_path: Path) -> None:
    project, store = SignedProject(), ModelStore(tmp_path)
    project.label(range(1, 13))
    first = Round(PROJECT, project.datastore, store, settings(tmp_path)).run()
    history_path(store.project_dir(PROJECT)).unlink()  # as if made by a version without history
    assert [e["round_id"] for e in HistoryReader().read(store.project_dir(PROJECT))] == [first["round_id"]]
    second = Round(PROJECT, project.datastore, store, settings(tmp_path)).run()
    lines = HistoryReader().read(store.project_dir(PROJECT))
    assert [e["round_id"] for e in lines] == [first["round_id"], second["round_id"]]
    assert lines[1]["skipped"] == 1 and lines[1]["validation_accuracy"] == second["validation_accuracy"]


APPENDER = """
import sys
from isal_backend.history import append
for i in range(150):
    append(sys.argv[1], {"writer": int(sys.argv[2]), "i": i, "pad": "x" * (50 + 37 * (i % 7))})
"""


def test_history_lines_stay_whole_under_concurrent_writers_and_a_killed_one(tmp_path: Path) -> None:
    writers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path), str(w)], cwd=REPO)
               for w in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    reader = HistoryReader()
    entries = reader.read(tmp_path)
    assert len(entries) == 600
    for w in range(4):
        assert [e["i"] for e in entries if e["writer"] == w] == list(range(150))
    # A writer killed mid-line leaves a torn line: the next append closes it and readers skip it.
    with open(history_path(tmp_path), "ab") as fh:
        fh.write(b'{"writer": 9, "i": "torn')
    assert len(reader.read(tmp_path)) == 600  # the torn line is not complete yet: not parsed
    append(tmp_path, {"writer": 5, "i": 0})
    entries = reader.read(tmp_path)
    assert len(entries) == 601 and entries[-1] == {"writer": 5, "i": 0}
    # A file replaced (a new inode) is read afresh.
    tmp = tmp_path / "other"
    append(tmp, {"only": 1})
    os.replace(history_path(tmp), history_path(tmp_path))
    assert reader.read(tmp_path) == [{"only": 1}]


def test_freshness_is_known_only_for_a_round_that_first_served_an_annotation() -> None:
    entries = [
        {"fetched_at": "2026-12-01T10:00:00+00:00", "finished_at": "2026-12-01T10:00:05+00:00",
         "newest_annotation_at": "2026-12-01T09:00:00Z"},  # the first round: nothing to compare with
        {"fetched_at": "2026-12-01T10:01:00+00:00", "finished_at": "2026-12-01T10:01:04+00:00",
         "newest_annotation_at": "2026-12-01T10:00:59.500000Z"},  # after the previous fetch: 4.5 s
        {"fetched_at": "2026-12-01T10:02:00+00:00", "finished_at": "2026-12-01T10:02:03+00:00",
         "newest_annotation_at": "2026-12-01T10:00:59.500000Z"},  # a forced round on the same labels
        {"fetched_at": "2026-12-01T10:03:00+00:00", "finished_at": "2026-12-01T10:03:03+00:00"},  # no label
    ]
    assert freshness(entries) == [None, 4.5, None, None]


def test_redact_keeps_paths_and_local_file_names_but_no_query_value() -> None:
    text = "image https://b.example/a.png?X-Amz-Signature=abc&X-Amz-Date=1 and /data/local-files/?d=cats/1.png"
    assert redact(text) == ("image https://b.example/a.png?X-Amz-Signature=REDACTED&X-Amz-Date=REDACTED and "
                            "/data/local-files/?d=cats/1.png")
    assert redact("gs://x/y.png?token&d=1") == "gs://x/y.png?REDACTED&d=1"
