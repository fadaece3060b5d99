"""Reconciliation: annotations whose webhook never arrived still reach a round (issue 10, item 8).

The projects here have no ML backend connected in Label Studio, so Label Studio sends no webhook at all:
every round below comes from the periodic check (embedded queue: its own thread, real rounds; RQ: the
worker's sweeper).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests

from isal_backend.queue.embedded import EmbeddedCoalescer
from isal_backend.settings import Settings
from isal_backend.store import ModelStore
from tests.jobs_for_tests import Harness
from tests.test_round_faults import CONFIG, annotate, data_url, make_project

pytestmark = pytest.mark.e2e


def _set_up(label_studio: Any, settings: Settings, project: int) -> None:
    """The project's folder as /setup leaves it, without /setup's own first round (a project without a round
    gets one on /setup since issue 9): these tests are about annotations that no event announced."""
    folder = settings.model_dir / "projects" / str(project)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "label_config.xml").write_text(CONFIG)


def _wait_report(store: ModelStore, project: int, labeled: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = store.load(project)
        if state is not None and state.report.get("labeled") == labeled:
            return state.report
        time.sleep(0.5)
    raise AssertionError(f"no round with {labeled} labels within {timeout_s} s")


def test_embedded_queue_starts_rounds_for_annotations_no_webhook_announced(label_studio: Any, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch):
    images = [{"image": data_url((200, 30, 30) if i % 2 else (30, 30, 200), 900 + i)} for i in range(12)]
    project, by_image = make_project(label_studio, "reconcile embedded", images)
    task_ids = [by_image[i["image"]] for i in images]
    for i, task in enumerate(task_ids[:4]):
        annotate(label_studio, task, "red" if i % 2 else "blue")
    # The round job reads its settings from the environment, as in the server process.
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token, "MODEL_DIR": str(tmp_path),
           "ISAL_BACKBONE": "small-cnn", "ISAL_WRITE_TOP_M": "0", "ISAL_RECONCILE_SECONDS": "2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = Settings.from_env()
    _set_up(label_studio, settings, project)
    store = ModelStore(tmp_path)
    co = EmbeddedCoalescer.from_settings(settings)
    try:
        co.ensure_started()
        first = _wait_report(store, project, 4, 120)
        time.sleep(6)  # three more checks: the round is newer than every annotation, so none starts
        assert store.load(project).round_id == first["round_id"]
        assert co.snapshot()["projects"][project]["events_round"] == "1"

        annotate(label_studio, task_ids[4], "blue")
        second = _wait_report(store, project, 5, 120)
        assert second["round_id"] != first["round_id"]
    finally:
        co.close()


@pytest.mark.redis
def test_rq_worker_sweeper_starts_one_round_per_missed_annotation(label_studio: Any, tmp_path: Path):
    project, by_image = make_project(label_studio, "reconcile rq", [{"image": data_url((9, 9, 9), 950 + i)}
                                                                   for i in range(4)])
    h = Harness(str(tmp_path), LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
                ISAL_RECONCILE_SECONDS="2", ISAL_LEASE_SECONDS="2")
    try:
        _set_up(label_studio, Settings.from_env(h.env), project)
        annotate(label_studio, next(iter(by_image.values())), "red")
        for i in range(2):  # two workers: the Redis lock lets one of them check per period
            h.start_worker(f"w{i}-{h.tag}")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not [r for r in h.records() if r["event"] == "end"]:
            time.sleep(0.3)
        time.sleep(8)  # more periods, on either worker: the test round writes no report, so the shared memory of
        # what was acted on is what holds
        ends = [r for r in h.records() if r["event"] == "end" and r["project"] == project]
        assert len(ends) == 1, ends
        assert h.project_state(project)["events_round"] == "1"
    finally:
        h.stop()

    assert (tmp_path / "models" / "projects" / str(project) / "label_config.xml").read_text() == CONFIG
    assert requests.get(f"{label_studio.url}/api/projects/{project}", headers=label_studio.legacy_headers,
                        timeout=30).json()["num_tasks_with_annotations"] == 1


def test_annotations_the_last_round_did_not_mirror_start_one_round(label_studio: Any, tmp_path: Path):
    """An annotation saved while a round read Label Studio can carry a time before that read and still be
    missing from it (bench live, 1.23.2); it was the last, so no event follows: the count brings it in."""
    from datetime import UTC, datetime, timedelta

    from isal_backend.queue.reconcile import Reconciler

    images = [{"image": data_url((200, 30, 30) if i % 2 else (30, 30, 200), 950 + i)} for i in range(6)]
    project, by_image = make_project(label_studio, "reconcile count", images)
    for i, image in enumerate(images[:4]):
        annotate(label_studio, by_image[image["image"]], "red" if i % 2 else "blue")
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
                        model_dir=tmp_path)
    _set_up(label_studio, settings, project)
    store = ModelStore(tmp_path)
    after_every_annotation = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()

    def round_that_mirrored(count: int) -> None:
        store.commit(project, f"isal-{count}", {}, {"kind": "classification"},
                     {"fetched_at": after_every_annotation, "labeled": count,
                      "fetch": {"mode": "incremental", "annotations": count}})

    started: list[int] = []
    reconciler = Reconciler(settings, submit=started.append, busy=lambda pid: False)
    round_that_mirrored(4)
    assert reconciler.run_once() == [] and started == []  # the round saw every annotation
    round_that_mirrored(3)
    [done] = reconciler.run_once()
    assert started == [project] and done["why"] == "count" and (done["annotations"], done["mirrored"]) == (4, 3)
    assert reconciler.run_once() == [] and started == [project]  # one round per count, not one per period
    annotate(label_studio, by_image[images[4]["image"]], "red")  # a fifth, still unseen: one more round
    assert [d["why"] for d in reconciler.run_once()] == ["count"] and started == [project, project]
