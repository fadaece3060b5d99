"""Embedded mode (no REDIS_URL): the same coalescing semantics on a thread inside the server process."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from isal_backend.bench.webhook_latency import measure_webhook_latency
from isal_backend.queue import ROUND
from isal_backend.queue.embedded import EmbeddedCoalescer
from isal_backend.status import StatusStore
from tests.jobs_for_tests import Harness

pytestmark = pytest.mark.redis  # the test jobs record what they saw in the real Redis


@pytest.fixture
def harness(tmp_path):
    h = Harness(str(tmp_path))
    del h.env["REDIS_URL"]
    yield h
    h.stop()


def _status(url: str, project: int) -> dict:
    with urllib.request.urlopen(f"{url}/status/{project}", timeout=5) as r:
        return json.load(r)


def test_embedded_burst_under_gunicorn_loses_nothing(harness, record_property):
    h = harness
    h.env["ISAL_TEST_JOB_SLEEP"] = "0.5"
    url = h.start_gunicorn(workers=1, threads=16)
    figures = measure_webhook_latency(f"{url}/webhook", n_events=300, concurrency=100, projects=(1, 2, 3))
    print(f"\nwebhook latency, embedded mode, 300 events, 100 in flight: {json.dumps(figures)}")
    record_property("webhook_latency_embedded", json.dumps(figures))
    assert figures["errors"] == 0 and figures["p99_ms"] < 1000

    deadline = time.time() + 90
    while time.time() < deadline:
        states = [_status(url, p)["queue"] for p in (1, 2, 3)]
        if all(s["running"] is None and not any(s["waiting"].values()) for s in states):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"embedded queue still busy: {states}")
    ends = [r for r in h.records() if r["event"] == "end"]
    assert len({r["job_id"] for r in ends}) == len(ends)
    for project, n_events in ((1, 100), (2, 100), (3, 100)):
        runs = sorted((r for r in ends if r["project"] == project), key=lambda r: r["ended"])
        assert runs and runs[-1]["events_seen"] == n_events
        assert all(r["concurrent"] == 1 for r in runs)
        assert len(runs) <= min(n_events, int(figures["wall_s"] / 0.5) * 3 + 4)
        assert _status(url, project)["last_job"]["outcome"] == "succeeded"


def test_a_slow_project_does_not_hold_back_another_projects_round(tmp_path):
    """Issue 10, item 3: project 1's round is slow; project 2's round, submitted after it, ends first, and
    project 1's next round still waits for its first (never two rounds of one project at once)."""
    h = Harness(str(tmp_path))
    try:
        os.environ["ISAL_TEST_RECORD_URL"] = h.env["ISAL_TEST_RECORD_URL"]
        os.environ["ISAL_TEST_RECORD_KEY"] = h.env["ISAL_TEST_RECORD_KEY"]
        co = EmbeddedCoalescer(
            targets={ROUND: "tests.jobs_for_tests.slow_project_one_round",
                     "score": "tests.jobs_for_tests.noop_scoring"},
            status_folder=Path(tmp_path) / "status", retries=0, threads=2,
        )
        first = co.submit(ROUND, 1)
        deadline = time.time() + 10
        while not any(r["event"] == "start" for r in h.records()) and time.time() < deadline:
            time.sleep(0.02)
        second = co.submit(ROUND, 1)  # waits for the first: same project
        other = co.submit(ROUND, 2)
        deadline = time.time() + 60
        while not co.idle() and time.time() < deadline:
            time.sleep(0.05)
        ends = {r["job_id"]: r for r in h.records() if r["event"] == "end"}
        assert set(ends) == {first.job_id, second.job_id, other.job_id}
        assert ends[other.job_id]["ended"] < ends[first.job_id]["ended"]
        assert ends[second.job_id]["started"] >= ends[first.job_id]["ended"]
        assert all(r["concurrent"] == 1 for r in ends.values())
        assert co.snapshot()["threads"] == 2
        co.close()
    finally:
        for key in ("ISAL_TEST_RECORD_URL", "ISAL_TEST_RECORD_KEY"):
            os.environ.pop(key, None)
        h.stop()


def test_embedded_rounds_run_at_the_configured_niceness_and_the_caller_keeps_its_own(tmp_path):
    h = Harness(str(tmp_path))
    try:
        os.environ["ISAL_TEST_RECORD_URL"] = h.env["ISAL_TEST_RECORD_URL"]
        os.environ["ISAL_TEST_RECORD_KEY"] = h.env["ISAL_TEST_RECORD_KEY"]
        base = os.getpriority(os.PRIO_PROCESS, 0)
        co = EmbeddedCoalescer(
            targets={ROUND: "tests.jobs_for_tests.record_round", "score": "tests.jobs_for_tests.noop_scoring"},
            status_folder=Path(tmp_path) / "status", retries=0, threads=1, nice=4,
        )
        co.submit(ROUND, 3)
        deadline = time.time() + 30
        while not co.idle() and time.time() < deadline:
            time.sleep(0.05)
        ends = [r for r in h.records() if r["event"] == "end"]
        assert [r["niceness"] for r in ends] == [min(19, base + 4)]
        assert os.getpriority(os.PRIO_PROCESS, 0) == base
        co.close()
    finally:
        for key in ("ISAL_TEST_RECORD_URL", "ISAL_TEST_RECORD_KEY"):
            os.environ.pop(key, None)
        h.stop()


def test_embedded_crash_is_retried_then_reported(tmp_path):
    h = Harness(str(tmp_path))
    try:
        co = EmbeddedCoalescer(
            targets={ROUND: "tests.jobs_for_tests.crash_round", "score": "tests.jobs_for_tests.noop_scoring"},
            status_folder=Path(tmp_path) / "status", retries=2, backoff=(0,),
        )
        os.environ["ISAL_TEST_RECORD_URL"] = h.env["ISAL_TEST_RECORD_URL"]
        os.environ["ISAL_TEST_RECORD_KEY"] = h.env["ISAL_TEST_RECORD_KEY"]
        sub = co.submit(ROUND, 4)
        deadline = time.time() + 30
        while not co.idle() and time.time() < deadline:
            time.sleep(0.05)
        crashes = [r for r in h.records() if r["event"] == "crash"]
        assert [r["job_id"] for r in crashes] == [sub.job_id] * 3
        store = StatusStore(redis=None, prefix="", folder=Path(tmp_path) / "status")
        status = _read(store, 4)
        assert status["last_failure"]["outcome"] == "failed" and status["last_failure"]["attempt"] == 3
        assert status["last_failure"]["error"] == "RuntimeError: deliberate crash for project 4"  # no traceback
        snap = co.snapshot()
        assert snap["jobs"]["failed"] == 1 and snap["jobs"]["retrying"] == 2
        assert "pend_round" not in snap["projects"][4] and "run_id" not in snap["projects"][4]
        co.close()
    finally:
        for key in ("ISAL_TEST_RECORD_URL", "ISAL_TEST_RECORD_KEY"):
            os.environ.pop(key, None)
        h.stop()


def test_embedded_key_refused_by_label_studio_fails_at_once(tmp_path, label_studio):
    """A 401 from the real Label Studio: no retry, the message (with the fix) in the status (issue 10, item 9)."""
    h = Harness(str(tmp_path))
    keys = {name: h.env[name] for name in ("ISAL_TEST_RECORD_URL", "ISAL_TEST_RECORD_KEY")}
    keys["ISAL_TEST_LS_URL"] = label_studio.url
    try:
        os.environ.update(keys)
        co = EmbeddedCoalescer(
            targets={ROUND: "tests.jobs_for_tests.refused_round", "score": "tests.jobs_for_tests.noop_scoring"},
            status_folder=Path(tmp_path) / "status", retries=3, backoff=(0,),
        )
        sub = co.submit(ROUND, 6)
        deadline = time.time() + 30
        while not co.idle() and time.time() < deadline:
            time.sleep(0.05)
        assert [r["job_id"] for r in h.records() if r["event"] == "refused"] == [sub.job_id]
        failure = _read(StatusStore(redis=None, prefix="", folder=Path(tmp_path) / "status"), 6)["last_failure"]
        assert failure["attempt"] == 1 and failure["error"].startswith("LabelStudioAuthError: ")
        assert "HTTP 401" in failure["error"] and "Fix:" in failure["error"] and "Traceback" not in failure["error"]
        assert co.snapshot()["jobs"]["failed"] == 1 and co.snapshot()["jobs"]["retrying"] == 0
        co.close()
    finally:
        for key in keys:
            os.environ.pop(key, None)
        h.stop()


def _read(store: StatusStore, project: int) -> dict:
    return json.loads((store.folder / f"project-{project}.json").read_text())
