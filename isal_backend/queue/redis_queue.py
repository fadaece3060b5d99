"""Redis + RQ implementation of the per-project coalescing queue.

State per project lives in one hash ``{prefix}:project:{id}`` and is only changed by the Lua scripts
below (atomic in Redis), so the webhook handler, RQ workers and sweepers on any host agree:

* ``pend_{kind}`` the waiting job's id (``pat_`` when it was set, ``plea_`` a lease while it blocks in a
  worker); ``run_id``/``run_kind``/``run_lease`` the running job and its lease (heartbeated).
* An event whose kind already has a waiting job is *absorbed*: the waiting job has not read anything
  yet and reads the latest state when it starts. Otherwise it becomes the new waiting job and is
  enqueued to RQ, even while another job of the project runs, so no event after that job's fetch is lost.
* A job that reaches a worker while another job of its project runs blocks (polling) until the lock is
  free: one per project at most, because only the waiting job can be in that state.
* Leases make a killed worker harmless: an expired ``run_lease`` is taken over by the next job, and the
  sweeper (``python -m isal_backend worker`` runs it at start and periodically) clears dead leases and
  enqueues a recovery round, so the killed round's work is redone without waiting for a new event.
* Crashes: RQ ``Retry`` with backoff; a failing job that will be retried becomes the waiting job again
  (unless a newer one waits), the last failure is recorded in the project's status and counters.

Job ids are ``{kind}-{project}-{uuid4 hex}``: unique, unlike label-studio-ml's whole seconds.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis import Redis
from rq import Queue, Retry, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from isal_backend.pacing import KEEP_EVENTS
from isal_backend.queue.base import KINDS, ROUND, SCORE, Outcome, Submission, failure_message, is_retryable, resolve
from isal_backend.queue.context import JobContext, reset_current_job, set_current_job
from isal_backend.settings import Settings
from isal_backend.status import StatusStore, record_job_outcome

logger = logging.getLogger(__name__)

RUNNER = "isal_backend.queue.redis_queue.run_job"
JOB_TIMEOUT_S = 6 * 3600
RESULT_TTL_S = 24 * 3600
FAILURE_TTL_S = 7 * 24 * 3600
POLL_S = 0.1
ORPHAN_GRACE_S = 30.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

SUBMIT_LUA = _NOW + """
local kind = ARGV[1]
redis.call('SADD', KEYS[2], ARGV[3])
local events = tonumber(redis.call('HGET', KEYS[1], 'events_' .. kind) or '0')
if ARGV[4] == '1' then events = redis.call('HINCRBY', KEYS[1], 'events_' .. kind, 1) end
for i = 5, #ARGV do redis.call('SADD', KEYS[3], ARGV[i]) end
local pend = redis.call('HGET', KEYS[1], 'pend_' .. kind)
if pend then
  local plea = tonumber(redis.call('HGET', KEYS[1], 'plea_' .. kind) or '0')
  if plea == 0 or plea > now then
    redis.call('HINCRBY', KEYS[1], 'absorbed_' .. kind, 1)
    return {'absorbed', pend, events}
  end
  redis.call('HINCRBY', KEYS[1], 'lost_waiting', 1)
end
redis.call('HSET', KEYS[1], 'pend_' .. kind, ARGV[2], 'pat_' .. kind, now, 'plea_' .. kind, 0)
return {'enqueue', ARGV[2], events}
"""

START_LUA = _NOW + """
local kind, me, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local pend = redis.call('HGET', KEYS[1], 'pend_' .. kind)
if pend and pend ~= me then return {'superseded', pend} end
local run = redis.call('HGET', KEYS[1], 'run_id')
local rlease = tonumber(redis.call('HGET', KEYS[1], 'run_lease') or '0')
if run and run == me and rlease > now then return {'duplicate', run} end
if run and run ~= me and rlease > now then
  if pend == me then redis.call('HSET', KEYS[1], 'plea_' .. kind, now + lease) end
  return {'wait', run}
end
local took_over = ''
if run and run ~= me then
  redis.call('HINCRBY', KEYS[1], 'lost_running', 1)
  took_over = run
end
redis.call('HSET', KEYS[1], 'run_id', me, 'run_kind', kind, 'run_lease', now + lease, 'run_since', now)
if pend == me then redis.call('HDEL', KEYS[1], 'pend_' .. kind, 'pat_' .. kind, 'plea_' .. kind) end
local events = tonumber(redis.call('HGET', KEYS[1], 'events_' .. kind) or '0')
local out = {'run', took_over, events}
if kind == 'score' then
  local ids = redis.call('SMEMBERS', KEYS[2])
  redis.call('DEL', KEYS[2])
  for _, v in ipairs(ids) do table.insert(out, v) end
end
return out
"""

HEARTBEAT_LUA = _NOW + """
if redis.call('HGET', KEYS[1], 'run_id') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'run_lease', now + tonumber(ARGV[2]))
  return 1
end
return 0
"""

FINISH_LUA = _NOW + """
local kind, me, outcome = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', KEYS[1], 'run_id') == me then
  redis.call('HDEL', KEYS[1], 'run_id', 'run_kind', 'run_lease', 'run_since')
end
redis.call('HINCRBY', KEYS[1], 'n_' .. outcome .. '_' .. kind, 1)
for i = 5, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
if ARGV[4] == '1' and not redis.call('HGET', KEYS[1], 'pend_' .. kind) then
  redis.call('HSET', KEYS[1], 'pend_' .. kind, me, 'pat_' .. kind, now, 'plea_' .. kind, 0)
  return 'requeued'
end
return 'released'
"""

SWEEP_LUA = _NOW + """
local out = {}
local run = redis.call('HGET', KEYS[1], 'run_id')
if run then
  local rlease = tonumber(redis.call('HGET', KEYS[1], 'run_lease') or '0')
  if rlease <= now then
    local kind = redis.call('HGET', KEYS[1], 'run_kind') or 'round'
    redis.call('HDEL', KEYS[1], 'run_id', 'run_kind', 'run_lease', 'run_since')
    redis.call('HINCRBY', KEYS[1], 'lost_running', 1)
    table.insert(out, 'run'); table.insert(out, run); table.insert(out, kind)
  end
end
for _, kind in ipairs({'round', 'score'}) do
  local pend = redis.call('HGET', KEYS[1], 'pend_' .. kind)
  local plea = tonumber(redis.call('HGET', KEYS[1], 'plea_' .. kind) or '0')
  if pend and plea > 0 and plea <= now then
    redis.call('HDEL', KEYS[1], 'pend_' .. kind, 'pat_' .. kind, 'plea_' .. kind)
    redis.call('HINCRBY', KEYS[1], 'lost_waiting', 1)
    table.insert(out, 'pend'); table.insert(out, pend); table.insert(out, kind)
  elseif pend and plea == 0 then
    local pat = tonumber(redis.call('HGET', KEYS[1], 'pat_' .. kind) or '0')
    table.insert(out, 'queued'); table.insert(out, pend); table.insert(out, kind .. ':' .. (now - pat))
  end
end
return out
"""

# An annotator's event (see isal_backend.pacing): its time on Redis's clock, the newest ARGV[1] kept.
NOTE_ACTIVITY_LUA = _NOW + """
redis.call('LPUSH', KEYS[1], now)
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[1]) - 1)
redis.call('PEXPIRE', KEYS[1], 3600000)
return 1
"""
# Redis's clock now, then the kept events' times (newest first): their ages need no clock of ours.
ACTIVITY_LUA = _NOW + """
local out = {now}
for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do table.insert(out, tonumber(v)) end
return out
"""
CLEAR_PEND_LUA = """
if redis.call('HGET', KEYS[1], 'pend_' .. ARGV[1]) == ARGV[2]
   and tonumber(redis.call('HGET', KEYS[1], 'plea_' .. ARGV[1]) or '0') == 0 then
  redis.call('HDEL', KEYS[1], 'pend_' .. ARGV[1], 'pat_' .. ARGV[1], 'plea_' .. ARGV[1])
  return 1
end
return 0
"""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def new_job_id(kind: str, project_id: int) -> str:
    return f"{kind}-{int(project_id)}-{uuid.uuid4().hex}"


class RedisCoalescer:
    """Submits events, runs the sweeper and reports queue state; one per process (thread-safe)."""

    def __init__(
        self,
        connection: Redis,
        *,
        prefix: str = "isal",
        queue_name: str = "isal",
        targets: dict[str, str] | None = None,
        lease_seconds: float = 30.0,
        retries: int = 3,
        backoff: tuple[int, ...] = (10, 60, 300),
    ) -> None:
        self.redis = connection
        self.prefix = prefix
        self.queue = Queue(queue_name, connection=connection)
        self.targets = targets or {
            ROUND: "isal_backend.jobs.entry.run_round",
            SCORE: "isal_backend.jobs.entry.score_new_tasks",
        }
        self.lease_ms = int(lease_seconds * 1000)
        self.retries = retries
        self.backoff = list(backoff)
        self._submit = connection.register_script(SUBMIT_LUA)
        self._start = connection.register_script(START_LUA)
        self._heartbeat = connection.register_script(HEARTBEAT_LUA)
        self._finish = connection.register_script(FINISH_LUA)
        self._sweep = connection.register_script(SWEEP_LUA)
        self._clear_pend = connection.register_script(CLEAR_PEND_LUA)
        self._note_activity = connection.register_script(NOTE_ACTIVITY_LUA)
        self._activity = connection.register_script(ACTIVITY_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisCoalescer:
        assert settings.redis_url, "RedisCoalescer needs REDIS_URL"
        # A connect timeout: a Redis that drops packets must not hold a webhook for the OS's minutes-long default.
        conn = Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=2, health_check_interval=30)
        return cls(
            conn,
            prefix=settings.redis_prefix,
            queue_name=settings.rq_queue,
            targets={ROUND: settings.round_job, SCORE: settings.score_job},
            lease_seconds=settings.lease_seconds,
            retries=settings.job_retries,
            backoff=settings.retry_backoff,
        )

    # keys --------------------------------------------------------------------------------------
    def project_key(self, project_id: int) -> str:
        return f"{self.prefix}:project:{int(project_id)}"

    def score_ids_key(self, project_id: int) -> str:
        return f"{self.prefix}:project:{int(project_id)}:score_ids"

    def activity_key(self, project_id: int) -> str:
        return f"{self.prefix}:project:{int(project_id)}:activity"

    @property
    def projects_key(self) -> str:
        return f"{self.prefix}:projects"

    @property
    def status_store(self) -> StatusStore:
        return StatusStore(redis=self.redis, prefix=self.prefix, folder=None)  # type: ignore[arg-type]

    # events ------------------------------------------------------------------------------------
    def submit(
        self, kind: str, project_id: int, task_ids: list[int] | None = None, *, count_event: bool = True
    ) -> Submission:
        """Record one event; enqueue a new waiting job unless one already waits (then it absorbs the event)."""
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        pid = int(project_id)
        job_id = new_job_id(kind, pid)
        ids = [str(int(t)) for t in (task_ids or [])]
        keys = [self.project_key(pid), self.projects_key, self.score_ids_key(pid)]
        state, returned_id, events = self._submit(keys=keys, args=[kind, job_id, pid, int(count_event), *ids])
        state, returned_id = _s(state), _s(returned_id)
        if state == "enqueue":
            try:
                self._enqueue(kind, pid, returned_id)
            except BaseException:
                self._clear_pend(keys=[self.project_key(pid)], args=[kind, returned_id])
                raise
            return Submission(kind, pid, returned_id, "enqueued", int(events))
        return Submission(kind, pid, returned_id, "absorbed", int(events))

    def note_activity(self, project_id: int) -> None:
        """An annotator just submitted, updated or deleted an annotation: rounds pace their calls around it."""
        self._note_activity(keys=[self.activity_key(project_id)], args=[KEEP_EVENTS])

    def activity(self, project_id: int) -> list[float]:
        """Seconds since each of the project's recent annotator events, newest first (see isal_backend.pacing)."""
        now, *stamps = (int(v) for v in self._activity(keys=[self.activity_key(project_id)]))
        return [max(0.0, (now - stamp) / 1000) for stamp in stamps]

    def job_config(self, kind: str) -> dict[str, Any]:
        return {"prefix": self.prefix, "target": self.targets[kind], "lease_ms": self.lease_ms}

    def _enqueue(self, kind: str, project_id: int, job_id: str) -> Job:
        retry = Retry(max=self.retries, interval=self.backoff) if self.retries > 0 else None
        return self.queue.enqueue_call(
            func=RUNNER,
            args=(kind, project_id, self.job_config(kind)),
            job_id=job_id,
            timeout=JOB_TIMEOUT_S,
            result_ttl=RESULT_TTL_S,
            failure_ttl=FAILURE_TTL_S,
            retry=retry,
            meta={"project": project_id, "kind": kind},
            description=f"isal {kind} for project {project_id}",
        )

    # recovery ----------------------------------------------------------------------------------
    def sweep(self, orphan_grace_s: float = ORPHAN_GRACE_S) -> list[dict[str, Any]]:
        """Clear dead leases and lost waiting jobs, and enqueue replacements; returns what it did."""
        actions: list[dict[str, Any]] = []
        for raw in self.redis.smembers(self.projects_key):
            pid = int(raw)
            out = [_s(v) for v in self._sweep(keys=[self.project_key(pid)])]
            for i in range(0, len(out), 3):
                what, job_id, kind = out[i], out[i + 1], out[i + 2]
                if what == "queued":
                    kind, _, age_ms = kind.partition(":")
                    if (
                        float(age_ms) / 1000 < orphan_grace_s
                        or self._job_alive(job_id)
                        or not self._clear_pend(keys=[self.project_key(pid)], args=[kind, job_id])
                    ):
                        continue
                    logger.warning("project %s: waiting %s job %s is not in RQ; resubmitting", pid, kind, job_id)
                elif what == "run":
                    logger.error("project %s: %s job %s lost its worker (lease expired); recovering", pid, kind, job_id)
                    record_job_outcome(pid, kind, job_id, Outcome.LOST, error="worker died", store=self.status_store)
                    kind = ROUND  # its work (and any task ids it took) is redone by a full round
                else:
                    logger.warning("project %s: waiting %s job %s lost its worker; resubmitting", pid, kind, job_id)
                resubmitted = self.submit(kind, pid, count_event=False)
                actions.append({"project": pid, "lost": job_id, "what": what, "resubmitted": resubmitted})
        return actions

    def _job_alive(self, job_id: str) -> bool:
        try:
            job = Job.fetch(job_id, connection=self.redis)
        except NoSuchJobError:
            return False
        return _s(job.get_status(refresh=False)) not in ("finished", "failed", "stopped", "canceled")

    # observability -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Queue depth, RQ jobs by state, and each project's coalescing state and counters."""
        q = self.queue
        jobs = {
            "queued": q.count,
            "started": q.started_job_registry.count,
            "scheduled": q.scheduled_job_registry.count,
            "deferred": q.deferred_job_registry.count,
            "finished": q.finished_job_registry.count,
            "failed": q.failed_job_registry.count,
        }
        projects: dict[int, dict[str, Any]] = {}
        ids = sorted(int(p) for p in self.redis.smembers(self.projects_key))
        pipe = self.redis.pipeline()
        for pid in ids:
            pipe.hgetall(self.project_key(pid))
        for pid, raw in zip(ids, pipe.execute(), strict=True):
            projects[pid] = {_s(k): _s(v) for k, v in raw.items()}
        return {"mode": "redis", "queue": q.name, "queue_depth": jobs["queued"], "jobs": jobs, "projects": projects}

    def close(self) -> None:
        self.redis.close()


# --------------------------------------------------------------------------------------------------
# The function RQ runs (by its dotted path RUNNER): coalescing bookkeeping around the real job.

class _Heartbeat(threading.Thread):
    """Renews the running lease so a live job keeps it and a killed one loses it within a lease."""

    def __init__(self, beat: Callable[[], int], interval_s: float) -> None:
        super().__init__(daemon=True, name="isal-lease")
        self.beat, self.interval_s = beat, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                if not self.beat():
                    logger.error("lost the project's running lock (lease expired during the job)")
            except Exception:  # noqa: BLE001 - a Redis blip must not kill the job; the next beat retries
                logger.warning("lease heartbeat failed", exc_info=True)


def run_job(kind: str, project_id: int, config: dict[str, Any]) -> dict[str, Any]:
    """Wait for the project's lock, run the target with the latest state, release; re-raise for RQ Retry."""
    job = get_current_job()
    assert job is not None, "run_job runs inside an RQ worker"
    conn = job.connection
    co = RedisCoalescer(conn, prefix=config["prefix"], lease_seconds=config["lease_ms"] / 1000)
    key, ids_key = co.project_key(project_id), co.score_ids_key(project_id)
    lease_ms = int(config["lease_ms"])
    while True:
        out = [_s(v) for v in co._start(keys=[key, ids_key], args=[kind, job.id, lease_ms])]
        if out[0] == "superseded":
            logger.info("project %s: %s job %s superseded by waiting job %s", project_id, kind, job.id, out[1])
            co.redis.hincrby(key, f"n_superseded_{kind}", 1)
            return {"outcome": Outcome.SUPERSEDED, "by": out[1]}
        if out[0] == "duplicate":  # a second delivery of a job that runs (two schedulers moved one retry)
            logger.warning("project %s: %s job %s is already running elsewhere; this copy does nothing", project_id,
                           kind, job.id)
            return {"outcome": Outcome.SUPERSEDED, "by": out[1]}
        if out[0] == "run":
            break
        time.sleep(POLL_S)
    took_over, events, task_ids = out[1] or None, int(out[2]), tuple(int(t) for t in out[3:])
    if took_over:
        logger.error("project %s: took over from %s, whose worker died", project_id, took_over)
        record_job_outcome(project_id, kind, took_over, Outcome.LOST, error="worker died", store=co.status_store)
    ctx = JobContext(kind, int(project_id), job.id, events, task_ids, took_over, "redis", co.status_store,
                     successor_waiting=lambda: bool(co.redis.hget(key, f"pend_{kind}")),
                     submit_round=lambda: RedisCoalescer.from_settings(Settings.from_env()).submit(
                         ROUND, int(project_id), count_event=False),
                     activity=lambda: co.activity(int(project_id)))
    beat = _Heartbeat(lambda: co._heartbeat(keys=[key], args=[job.id, lease_ms]), lease_ms / 3000)
    beat.start()
    token = set_current_job(ctx)
    started = time.time()
    try:
        target = resolve(config["target"])
        result = target(int(project_id)) if kind == ROUND else target(int(project_id), list(task_ids))
    except BaseException as exc:
        will_retry = bool(job.retries_left and job.retries_left > 0)
        if will_retry and not is_retryable(exc):
            job.retries_left = 0  # RQ's failure handling reads this very object: no retry is scheduled
            will_retry = False
        restore = [str(t) for t in task_ids]
        outcome = Outcome.RETRYING if will_retry else Outcome.FAILED
        co._finish(keys=[key, ids_key], args=[kind, job.id, outcome, int(will_retry)] + restore)
        logger.error("project %s: %s job %s %s: %r", project_id, kind, job.id, outcome, exc, exc_info=True)
        record_job_outcome(project_id, kind, job.id, outcome, error=failure_message(exc), store=co.status_store)
        raise
    finally:
        beat.stopped.set()
        reset_current_job(token)
    co._finish(keys=[key, ids_key], args=[kind, job.id, Outcome.SUCCEEDED, 0])
    record_job_outcome(
        project_id, kind, job.id, Outcome.SUCCEEDED, store=co.status_store, seconds=round(time.time() - started, 3)
    )
    return {"outcome": Outcome.SUCCEEDED, "events_seen": events, "result": result if _jsonable(result) else None}


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (dict, list, str, int, float, bool))
