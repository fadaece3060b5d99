"""The coalescing queue on the real Redis with real RQ workers and the real app under gunicorn."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest

from isal_backend.bench.webhook_latency import measure_webhook_latency
from isal_backend.pacing import KEEP_EVENTS
from isal_backend.queue import ROUND
from isal_backend.queue.redis_queue import RedisCoalescer
from isal_backend.server import create_app
from isal_backend.settings import Settings
from isal_backend.status import project_status
from tests.jobs_for_tests import Harness

pytestmark = pytest.mark.redis


@pytest.fixture
def harness(tmp_path):
    h = Harness(str(tmp_path))
    yield h
    h.stop()


def _coalescer(h: Harness) -> RedisCoalescer:
    return RedisCoalescer.from_settings(Settings.from_env(h.env))


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_burst_of_500_webhooks_for_3_projects_loses_nothing(harness, record_property):
    """500 events in a few seconds at 100 in flight: every project's last job saw its last event."""
    h = harness
    h.env["ISAL_TEST_JOB_SLEEP"] = "0.8"
    for i in range(2):
        h.start_worker(f"w{i}-{h.tag}")
    url = h.start_gunicorn()

    figures = measure_webhook_latency(f"{url}/webhook", n_events=500, concurrency=100, projects=(1, 2, 3))
    print(f"\nwebhook latency, 500 events, 100 in flight, gunicorn 2x16 + Redis: {json.dumps(figures)}")
    record_property("webhook_latency", json.dumps(figures))
    assert figures["errors"] == 0
    assert figures["wall_s"] < 30
    assert figures["p99_ms"] < 1000, figures  # Label Studio's webhook timeout

    h.wait_quiet([1, 2, 3])
    ends = [r for r in h.records() if r["event"] == "end"]
    starts = [r for r in h.records() if r["event"] == "start"]
    assert len({r["job_id"] for r in starts}) == len(starts), "job ids must be unique, each job runs once"
    max_runs = int(figures["wall_s"] / 0.8) + 4
    for project, n_events in ((1, 167), (2, 167), (3, 166)):
        runs = sorted((r for r in ends if r["project"] == project), key=lambda r: r["ended"])
        assert runs, f"project {project} never ran"
        assert runs[-1]["events_seen"] == n_events, f"project {project}: last job missed events"
        assert runs[-1]["events_in_redis"] == n_events
        assert all(r["concurrent"] == 1 for r in runs), f"project {project}: two jobs ran at once"
        for a, b in zip(runs, runs[1:], strict=False):
            assert a["ended"] <= b["started"] + 0.05, "runs of one project overlap"
        assert 1 <= len(runs) <= min(n_events, max_runs), f"project {project}: {len(runs)} runs"
        state = h.project_state(project)
        assert int(state["events_round"]) == n_events
        assert int(state.get("absorbed_round", 0)) + len(runs) >= n_events - 1

    # /metrics on the same Redis reports the rounds and never a secret
    app = create_app(Settings.from_env({**h.env, "LABEL_STUDIO_URL": "http://127.0.0.1:9",
                                        "LABEL_STUDIO_API_KEY": "sekrit-key-123"}))
    text = app.test_client().get("/metrics").data.decode()
    assert 'isal_project_events_total{kind="round",project="1"} 167.0' in text
    assert "sekrit-key-123" not in text
    app.config["ISAL_STATE"].coalescer.close()


def test_crashing_job_is_retried_then_reported(harness):
    h = harness
    h.env.update(ISAL_ROUND_JOB="tests.jobs_for_tests.crash_round", ISAL_JOB_RETRIES="2", ISAL_RETRY_BACKOFF="1")
    h.start_worker(f"w-{h.tag}")
    co = _coalescer(h)
    sub = co.submit(ROUND, 7)
    assert sub.state == "enqueued"

    _wait_for(lambda: sub.job_id in co.queue.failed_job_registry.get_job_ids(), 60, "the job to fail for good")
    crashes = [r for r in h.records() if r["event"] == "crash"]
    assert [r["job_id"] for r in crashes] == [sub.job_id] * 3  # first try + 2 retries, same job
    settings = Settings.from_env(h.env)
    status = project_status(7, settings)
    assert status["last_failure"]["outcome"] == "failed"
    assert status["last_failure"]["error"] == "RuntimeError: deliberate crash for project 7"  # no traceback
    state = h.project_state(7)
    assert "run_id" not in state and "pend_round" not in state, "a failed job must not wedge the project"
    assert state["n_failed_round"] == "1" and state["n_retrying_round"] == "2"

    app = create_app(settings)
    text = app.test_client().get("/metrics").data.decode()
    assert 'isal_last_job_failed{project="7"} 1.0' in text
    assert 'isal_jobs{state="failed"} 1.0' in text
    assert 'isal_project_job_ends_total{kind="round",outcome="failed",project="7"} 1.0' in text
    body = app.test_client().get("/status/7").get_json()
    assert body["last_failure"]["job_id"] == sub.job_id
    assert "Traceback" not in json.dumps(body) and 'File \\"' not in json.dumps(body)
    app.config["ISAL_STATE"].coalescer.close()

    # the project is not wedged: the next event runs a new job (which crashes again, as configured)
    again = co.submit(ROUND, 7)
    assert again.state == "enqueued" and again.job_id != sub.job_id
    _wait_for(lambda: any(r["job_id"] == again.job_id for r in h.records()), 30, "the next job to run")


def test_a_key_label_studio_refuses_fails_at_once_without_retries(harness, label_studio):
    """A 401 is not transient: the job fails on its first attempt, with the fix in the message (issue 10, item 9)."""
    h = harness
    h.env.update(ISAL_ROUND_JOB="tests.jobs_for_tests.refused_round", ISAL_JOB_RETRIES="3",
                 ISAL_RETRY_BACKOFF="1", ISAL_TEST_LS_URL=label_studio.url)
    h.start_worker(f"w-{h.tag}")
    co = _coalescer(h)
    sub = co.submit(ROUND, 12)
    _wait_for(lambda: sub.job_id in co.queue.failed_job_registry.get_job_ids(), 60, "the job to fail")
    time.sleep(2.5)  # a retry (1 s backoff) would have run by now
    assert [r["job_id"] for r in h.records() if r["event"] == "refused"] == [sub.job_id]
    failure = project_status(12, Settings.from_env(h.env))["last_failure"]
    assert failure["outcome"] == "failed" and failure["error"].startswith("LabelStudioAuthError: ")
    assert "HTTP 401" in failure["error"] and "Fix: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in failure["error"]
    state = h.project_state(12)
    assert state["n_failed_round"] == "1" and "n_retrying_round" not in state
    assert co.queue.scheduled_job_registry.count == 0


def test_worker_killed_mid_job_is_recovered_by_the_sweeper(harness):
    """kill -9 of a worker (and its work horse) mid-round: the lease expires and the round is redone."""
    h = harness
    h.env.update(ISAL_ROUND_JOB="tests.jobs_for_tests.slow_round", ISAL_LEASE_SECONDS="2")
    victim = h.start_worker(f"victim-{h.tag}", env={"ISAL_TEST_SLOW_S": "120"})
    co = _coalescer(h)
    first = co.submit(ROUND, 9)
    start = _wait_for(lambda: [r for r in h.records() if r["event"] == "slow-start"], 30, "the round to start")
    h.kill(victim, signal.SIGKILL, horse_pid=start[0]["pid"])
    assert h.project_state(9)["run_id"] == first.job_id  # the dead job still holds the lock...

    h.start_worker(f"rescuer-{h.tag}", env={"ISAL_TEST_SLOW_S": "0.2"})
    ends = _wait_for(lambda: [r for r in h.records() if r["event"] == "slow-end"], 30, "a recovery round to finish")
    assert ends[0]["job_id"] != first.job_id
    h.wait_quiet([9], timeout_s=30)
    status = project_status(9, Settings.from_env(h.env))
    assert status["last_failure"]["outcome"] == "lost" and status["last_failure"]["job_id"] == first.job_id
    assert int(h.project_state(9)["lost_running"]) >= 1


def test_retries_run_on_time_after_the_scheduler_holder_is_killed(harness):
    """RQ's scheduler lock of a killed worker lives 61 s and others only try for it every 10 minutes: retries
    stalled for over 10 minutes. Now a surviving worker takes the dead holder's lock within seconds."""
    h = harness
    h.env.update(ISAL_ROUND_JOB="tests.jobs_for_tests.crash_round", ISAL_JOB_RETRIES="1", ISAL_RETRY_BACKOFF="3")
    lock = f"rq:scheduler-lock:{h.env['RQ_QUEUE']}"
    holder = h.start_worker(f"holder-{h.tag}")
    dead_name = _wait_for(lambda: h.redis.get(lock), 90, "the first worker to take the scheduler lock")
    h.start_worker(f"other-{h.tag}")
    _wait_for(lambda: h.redis.exists(f"rq:worker:other-{h.tag}"), 90, "the second worker to start")
    h.kill(holder, signal.SIGKILL)
    assert h.redis.get(lock) == dead_name  # the dead worker's lock outlives it
    co = _coalescer(h)
    sub = co.submit(ROUND, 13)
    crashes = _wait_for(lambda: (c := [r for r in h.records() if r["event"] == "crash"]) and len(c) >= 2 and c, 40,
                        "the retry to run (it waits for a scheduler)")
    assert [c["job_id"] for c in crashes] == [sub.job_id] * 2
    assert crashes[1]["at"] - crashes[0]["at"] < 3 + 12  # its 3 s backoff, plus at most the takeover
    assert h.redis.get(lock) != dead_name
    _wait_for(lambda: h.project_state(13).get("n_failed_round") == "1", 30, "the job to fail for good")


def test_worker_killed_mid_job_next_event_takes_over_with_plain_rq_worker(harness):
    """Without the sweeper (plain ``rq worker``), the next event's job takes the expired lock over."""
    h = harness
    h.env.update(ISAL_ROUND_JOB="tests.jobs_for_tests.slow_round", ISAL_LEASE_SECONDS="2")
    victim = h.start_worker(f"victim-{h.tag}", env={"ISAL_TEST_SLOW_S": "120"}, plain_rq=True)
    co = _coalescer(h)
    first = co.submit(ROUND, 11)
    start = _wait_for(lambda: [r for r in h.records() if r["event"] == "slow-start"], 30, "the round to start")
    h.kill(victim, signal.SIGKILL, horse_pid=start[0]["pid"])

    second = co.submit(ROUND, 11)
    assert second.state == "enqueued"
    third = co.submit(ROUND, 11)
    assert third.state == "absorbed" and third.job_id == second.job_id
    h.start_worker(f"rescuer-{h.tag}", env={"ISAL_TEST_SLOW_S": "0.2"}, plain_rq=True)
    ends = _wait_for(lambda: [r for r in h.records() if r["event"] == "slow-end"], 30, "the next round to finish")
    assert ends[0]["job_id"] == second.job_id
    start = next(r for r in h.records() if r["event"] == "slow-start" and r["job_id"] == second.job_id)
    assert start["took_over_from"] == first.job_id
    assert start["events_seen"] == 3
    h.wait_quiet([11], timeout_s=30)


def test_event_while_running_enqueues_one_waiting_job(harness):
    """Run -> events arrive -> exactly one waiting job, which starts after the run and sees them all."""
    h = harness
    h.env["ISAL_TEST_JOB_SLEEP"] = "1.5"
    for i in range(2):  # two workers: the waiting job really reaches a worker while the first runs
        h.start_worker(f"w{i}-{h.tag}")
    co = _coalescer(h)
    first = co.submit(ROUND, 5)
    _wait_for(lambda: any(r["event"] == "start" for r in h.records()), 30, "the first round to start")
    more = [co.submit(ROUND, 5) for _ in range(10)]
    assert more[0].state == "enqueued" and {m.job_id for m in more} == {more[0].job_id}
    assert all(m.state == "absorbed" for m in more[1:])
    h.wait_quiet([5], timeout_s=30)
    ends = [r for r in h.records() if r["event"] == "end"]
    assert [r["job_id"] for r in ends] == [first.job_id, more[0].job_id]
    assert ends[-1]["events_seen"] == 11 and all(r["concurrent"] == 1 for r in ends)
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the workers' parent: the test process
    assert all(r["niceness"] == min(19, base + 10) for r in ends)  # ISAL_WORKER_NICE's default


def test_annotator_events_reach_the_round_as_ages_on_redis_clock(harness):
    """What the webhook notes, the project's round job reads as ages (newest first, the last few kept)."""
    h = harness
    co = _coalescer(h)
    assert co.activity(6) == []
    for _ in range(KEEP_EVENTS + 3):
        co.note_activity(6)
        time.sleep(0.01)
    ages = co.activity(6)
    assert len(ages) == KEEP_EVENTS and ages == sorted(ages) and ages[-1] - ages[0] >= 0.05
    assert 0 < h.redis.pttl(co.activity_key(6)) <= 3600_000  # a project nobody labels leaves nothing behind
    assert co.activity(7) == []
    h.start_worker(f"w0-{h.tag}")
    co.submit(ROUND, 6)
    h.wait_quiet([6], timeout_s=30)
    start = next(r for r in h.records() if r["event"] == "start")
    assert len(start["activity"]) == KEEP_EVENTS and start["activity"] == sorted(start["activity"])
    assert start["activity"][0] >= ages[0]  # older by the time the job took to start


def test_worker_command_without_redis_url_is_a_clear_settings_error(tmp_path):
    import subprocess

    from tests.jobs_for_tests import PYTHON, ROOT

    env = {"PATH": "/usr/bin:/bin", "MODEL_DIR": str(tmp_path)}
    done = subprocess.run([PYTHON, "-m", "isal_backend", "worker", "--burst"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "REDIS_URL is not set" in done.stderr


def test_health_under_gunicorn_answers_without_auth(harness):
    url = harness.start_gunicorn(env={"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"}, workers=1, threads=2)
    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        assert json.load(r)["status"] == "UP"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/metrics", timeout=5)
    assert err.value.code == 401
