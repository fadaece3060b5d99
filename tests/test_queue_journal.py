"""No webhook event is lost while Redis is down (issue 10, item 8).

A private ``redis-server`` on a free port (started and stopped here, never the shared 127.0.0.1:6379 that
other tests use) serves the backend under gunicorn and a real RQ worker. With it stopped, webhooks are
answered 202 and journaled (fsynced) under MODEL_DIR, /health says the queue is degraded; once it
answers again the journal is queued (by the web process's replayer, or by a worker's sweeper when the
web process is gone) and a round sees every event.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from isal_backend.queue.journal import Journal, JournaledEvent
from tests.jobs_for_tests import Harness

pytestmark = pytest.mark.redis


class PrivateRedis:
    """``redis-server --port <free> --save "" --appendonly no --daemonize yes``, stoppable and restartable."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--daemonize", "yes", "--dir", str(self.folder),
                        "--pidfile", str(self.folder / "redis.pid"), "--logfile", str(self.folder / "redis.log")],
                       check=True, timeout=30)
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "private redis-server did not stop"
            time.sleep(0.1)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Harness, PrivateRedis]]:
    private = PrivateRedis(tmp_path)
    private.start()
    # The queue is on the private Redis; the test jobs still record what they saw in the shared one.
    h = Harness(str(tmp_path), REDIS_URL=private.url, ISAL_LEASE_SECONDS="2", ISAL_RECONCILE_SECONDS="0")
    try:
        yield h, private
    finally:
        h.stop()
        private.stop()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _event(project: int) -> dict:
    return {"action": "START_TRAINING", "project": {"id": project}}


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _project_hash(private: PrivateRedis, prefix: str, project: int) -> dict[str, str]:
    import redis

    raw = redis.Redis.from_url(private.url).hgetall(f"{prefix}:project:{project}")
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_webhooks_while_redis_is_down_are_journaled_then_queued(stack) -> None:
    h, private = stack
    url = h.start_gunicorn(workers=2, threads=8)
    h.start_worker(f"w-{h.tag}")
    assert _get(f"{url}/health")[1]["queue_state"] == "ok"

    private.stop()
    answers = [_post(f"{url}/webhook", _event(21)) for _ in range(20)]
    assert {status for status, _ in answers} == {202}, answers[:3]
    assert all(a["status"] == "journaled" and a["queue"] == "degraded" for _, a in answers)
    status, health = _get(f"{url}/health")
    assert status == 200 and health["status"] == "UP" and health["queue_state"] == "degraded"
    assert health["queue_detail"]["journaled_events"] == 20 and "does not answer" in health["queue_detail"]["error"]
    assert Journal.for_model_dir(h.env["MODEL_DIR"]).pending() == 20
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert "isal_journaled_events 20.0" in metrics and "isal_queue_up 0.0" in metrics
    assert not any(r["project"] == 21 for r in h.records())

    private.start()
    _wait(lambda: _get(f"{url}/health")[1]["queue_state"] == "ok", 30, "the queue to be ok again")
    assert Journal.for_model_dir(h.env["MODEL_DIR"]).pending() == 0
    ends = _wait(lambda: [r for r in h.records() if r["event"] == "end" and r["project"] == 21], 60,
                 "a round of project 21")
    _wait(lambda: "pend_round" not in _project_hash(private, h.prefix, 21)
          and "run_id" not in _project_hash(private, h.prefix, 21), 30, "project 21 to be idle")
    ends = [r for r in h.records() if r["event"] == "end" and r["project"] == 21]
    assert ends[-1]["events_seen"] == 20  # every journaled event reached the queue
    assert int(_project_hash(private, h.prefix, 21)["events_round"]) == 20


def test_a_worker_queues_the_journal_when_the_web_process_is_gone(stack) -> None:
    h, private = stack
    url = h.start_gunicorn(workers=1, threads=4)
    private.stop()
    for _ in range(5):
        assert _post(f"{url}/webhook", _event(22))[0] == 202
    gunicorn = h.procs[-1]
    h.kill(gunicorn, 9)  # the replayer dies with it; the events are on disk
    assert Journal.for_model_dir(h.env["MODEL_DIR"]).pending() == 5

    private.start()
    h.start_worker(f"w-{h.tag}")  # its sweeper (every half lease: 1 s) finds the journal
    _wait(lambda: [r for r in h.records() if r["event"] == "end" and r["project"] == 22], 90, "a round of project 22")
    assert Journal.for_model_dir(h.env["MODEL_DIR"]).pending() == 0
    assert int(_project_hash(private, h.prefix, 22)["events_round"]) == 5


def test_a_failed_replay_puts_the_rest_back(tmp_path: Path) -> None:
    """Delivery is at least once: what could not be submitted goes back, in order, nothing is dropped."""
    journal = Journal(tmp_path / "journal")
    for project in range(1, 6):
        journal.append(JournaledEvent("round", project, action="START_TRAINING"))
    seen: list[int] = []

    def flaky(event: JournaledEvent) -> None:
        if event.project_id == 3:
            raise ConnectionError("still down")
        seen.append(event.project_id)

    with pytest.raises(ConnectionError):
        journal.drain(flaky)
    assert seen == [1, 2] and journal.pending() == 3
    assert journal.drain(lambda e: seen.append(e.project_id)) == 3
    assert seen == [1, 2, 3, 4, 5] and journal.pending() == 0 and not journal.has_pending()
    assert oct((tmp_path / "journal" / ".lock").stat().st_mode & 0o777) == "0o600"
