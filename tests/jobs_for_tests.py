"""Real job functions for the queue tests (the servers/workers import them by dotted path).

Each run appends a JSON record to the Redis list ``{ISAL_TEST_RECORD_KEY}`` on ``ISAL_TEST_RECORD_URL``
(the tests' Redis, in both queue modes): which job ran, for which project, how many events it saw when
it started (from the queue's job context and, in Redis mode, read straight from the project's hash),
and whether another job of the same project was running at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

from redis import Redis

from isal_backend.queue import current_job

_conn: Redis | None = None


def _redis() -> Redis:
    global _conn
    if _conn is None:
        _conn = Redis.from_url(os.environ["ISAL_TEST_RECORD_URL"])
    return _conn


def _record(**entry: object) -> None:
    _redis().rpush(os.environ["ISAL_TEST_RECORD_KEY"], json.dumps(entry))


def _observe(project_id: int, sleep_s: float, task_ids: list[int] | None = None) -> None:
    ctx = current_job()
    assert ctx is not None, "jobs_for_tests runs inside a queue job"
    r = _redis()
    key = os.environ["ISAL_TEST_RECORD_KEY"]
    active = r.incr(f"{key}:active:{project_id}")
    in_redis = None
    if ctx.mode == "redis":
        prefix = os.environ.get("ISAL_REDIS_PREFIX", "isal")
        raw = r.hget(f"{prefix}:project:{project_id}", f"events_{ctx.kind}")
        in_redis = int(raw or 0)
    started = time.time()
    _record(event="start", project=project_id, job_id=ctx.job_id, kind=ctx.kind, pid=os.getpid(), at=started,
            activity=ctx.activity() if ctx.activity is not None else None)
    try:
        time.sleep(sleep_s)
    finally:
        r.decr(f"{key}:active:{project_id}")
    _record(
        event="end", project=project_id, job_id=ctx.job_id, kind=ctx.kind, events_seen=ctx.events_seen,
        events_in_redis=in_redis, concurrent=int(active), task_ids=task_ids, started=started, ended=time.time(),
        took_over_from=ctx.took_over_from, niceness=os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
    )


def record_round(project_id: int) -> dict:
    """A round that takes ISAL_TEST_JOB_SLEEP seconds (default 0.3) and records what it saw."""
    _observe(project_id, float(os.environ.get("ISAL_TEST_JOB_SLEEP", "0.3")))
    return {"ok": True}


def slow_project_one_round(project_id: int) -> dict:
    """Project 1's round takes 4 s (as one with images dripping in until their deadline), others 0.1 s."""
    _observe(project_id, 4.0 if int(project_id) == 1 else 0.1)
    return {"ok": True}


def record_scoring(project_id: int, task_ids: list[int]) -> None:
    _observe(project_id, 0.05, task_ids=list(task_ids))


def crash_round(project_id: int) -> None:
    """Always fails, after recording the attempt."""
    ctx = current_job()
    _record(event="crash", project=project_id, job_id=ctx.job_id if ctx else None, at=time.time())
    raise RuntimeError(f"deliberate crash for project {project_id}")


def refused_round(project_id: int) -> None:
    """Asks the real Label Studio at ISAL_TEST_LS_URL for the project with a key it refuses (401)."""
    from isal_backend.labelstudio.client import LabelStudioClient

    ctx = current_job()
    _record(event="refused", project=project_id, job_id=ctx.job_id if ctx else None, at=time.time())
    with LabelStudioClient(os.environ["ISAL_TEST_LS_URL"], "0" * 40, retries=0) as client:
        client.get_project(project_id)


def slow_round(project_id: int) -> None:
    """Runs for ISAL_TEST_SLOW_S (default 60 s) unless the worker is killed; records start and end."""
    ctx = current_job()
    _record(event="slow-start", project=project_id, job_id=ctx.job_id if ctx else None, pid=os.getpid(),
            events_seen=ctx.events_seen if ctx else None, took_over_from=ctx.took_over_from if ctx else None)
    time.sleep(float(os.environ.get("ISAL_TEST_SLOW_S", "60")))
    _record(event="slow-end", project=project_id, job_id=ctx.job_id if ctx else None)


def noop_round(project_id: int) -> None:
    """For server tests that only need a job target that exists."""


def noop_scoring(project_id: int, task_ids: list[int]) -> None:
    """For server tests that only need a job target that exists."""


def slow_noop_round(project_id: int) -> None:
    """A round that takes a second and does nothing (server tests of what a running round changes)."""
    time.sleep(1.0)


# --------------------------------------------------------------------------------------------------
# Harness shared by the queue tests: real Redis, real gunicorn and RQ worker subprocesses.

REDIS_BASE = os.environ.get("ISAL_TEST_REDIS", "redis://127.0.0.1:6379/0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):  # CI may use another venv layout
    import sys

    PYTHON = sys.executable


class Harness:
    """A unique key prefix, queue name and record list on the real Redis, plus the processes it started."""

    def __init__(self, tmp_path: str, **extra_env: str) -> None:
        import subprocess  # noqa: F401 - imported here so job workers do not pay for it
        import uuid

        self.tag = f"t{uuid.uuid4().hex[:10]}"
        self.redis = Redis.from_url(REDIS_BASE)
        self.redis.ping()
        self.tmp = tmp_path
        self.env = {
            **os.environ,
            "REDIS_URL": REDIS_BASE,
            "RQ_QUEUE": f"q-{self.tag}",
            "ISAL_REDIS_PREFIX": f"isal-{self.tag}",
            "ISAL_TEST_RECORD_URL": REDIS_BASE,
            "ISAL_TEST_RECORD_KEY": f"rec-{self.tag}",
            "MODEL_DIR": os.path.join(tmp_path, "models"),
            "ISAL_ROUND_JOB": "tests.jobs_for_tests.record_round",
            "ISAL_SCORE_JOB": "tests.jobs_for_tests.record_scoring",
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": ROOT,
            **extra_env,
        }
        self.procs: list = []

    @property
    def prefix(self) -> str:
        return self.env["ISAL_REDIS_PREFIX"]

    def records(self) -> list[dict]:
        return [json.loads(r) for r in self.redis.lrange(self.env["ISAL_TEST_RECORD_KEY"], 0, -1)]

    def project_state(self, project_id: int) -> dict[str, str]:
        raw = self.redis.hgetall(f"{self.prefix}:project:{project_id}")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def start(self, args: list[str], log_name: str, env: dict[str, str] | None = None):
        import subprocess

        log = open(os.path.join(self.tmp, f"{log_name}.log"), "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(args, cwd=ROOT, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log_file = log  # type: ignore[attr-defined]
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start_worker(self, name: str, env: dict[str, str] | None = None, plain_rq: bool = False):
        if plain_rq:
            args = [PYTHON, "-m", "rq.cli", "worker", "--url", REDIS_BASE, "--with-scheduler", "-n", name,
                    self.env["RQ_QUEUE"]]
        else:
            args = [PYTHON, "-m", "isal_backend", "worker", "--name", name]
        return self.start(args, name, env)

    def start_gunicorn(self, env: dict[str, str] | None = None, workers: int = 2, threads: int = 16) -> str:
        import socket
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        gunicorn = os.path.join(os.path.dirname(PYTHON), "gunicorn")
        proc = self.start([gunicorn, "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads",
                           str(threads), "--timeout", "60", "_wsgi:app"], "gunicorn", env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            if proc.poll() is not None:
                with open(proc.log_path) as log:
                    raise RuntimeError(f"gunicorn exited: {log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("gunicorn did not answer /health within 90 s")

    def kill(self, proc, sig: int, horse_pid: int | None = None) -> None:
        """Signal a process's group, and the RQ work horse (RQ forks it into its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if horse_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(horse_pid, sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop every process this harness started (by its own process group) and delete its keys."""
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (ProcessLookupError, Exception):  # noqa: BLE001
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)
            proc.log_file.close()
        # RQ work horses run in their own session: stop the ones our jobs reported (our own children)
        horses = {r["pid"] for r in self.records() if r.get("pid") and r["pid"] != os.getpid()}
        for pid in horses:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.cleanup_keys()

    def cleanup_keys(self) -> None:
        job_ids = set()
        for rec in self.records():
            if rec.get("job_id"):
                job_ids.add(rec["job_id"])
        patterns = [f"*{self.tag}*"]
        keys = set()
        for pattern in patterns:
            keys.update(self.redis.scan_iter(match=pattern, count=1000))
        for jid in job_ids:
            keys.update(self.redis.scan_iter(match=f"rq:*{jid}*", count=1000))
        for jid in self.rq_job_ids():
            keys.update(self.redis.scan_iter(match=f"rq:*{jid}*", count=1000))
        if keys:
            self.redis.delete(*keys)

    def rq_job_ids(self) -> set[str]:
        """Ids of every RQ job our prefix created (they embed the project, not the tag: read our hashes)."""
        ids = set()
        for key in self.redis.scan_iter(match=f"rq:*{self.env['RQ_QUEUE']}*", count=1000):
            kind = self.redis.type(key)
            if kind == b"list":
                ids.update(v.decode() for v in self.redis.lrange(key, 0, -1))
            elif kind == b"zset":
                ids.update(v.decode() for v in self.redis.zrange(key, 0, -1))
        return ids

    def wait_quiet(self, project_ids: list[int], timeout_s: float = 90.0) -> None:
        """Until no job of these projects runs or waits and our queue is empty."""
        deadline = time.time() + timeout_s
        queue_key = f"rq:queue:{self.env['RQ_QUEUE']}"
        while time.time() < deadline:
            busy = any(
                any(k.startswith(("pend_", "run_id")) for k in self.project_state(p)) for p in project_ids
            ) or self.redis.llen(queue_key) > 0
            if not busy:
                return
            time.sleep(0.2)
        raise AssertionError(f"projects still busy after {timeout_s} s: "
                             f"{ {p: self.project_state(p) for p in project_ids} }")
