"""Per-project status that jobs write and the server reads (for /metrics, /versions and operators).

Jobs run in RQ workers, the server in gunicorn: they share no memory, so the status lives in Redis
(hash ``{prefix}:status:{project}``) when REDIS_URL is set, else in ``MODEL_DIR/status/project-{id}.json``
(embedded mode: one process). Reports are JSON objects; never put a token in one (they are served).

The lead's round job calls :func:`record_round` at its end with a report such as::

    {"model_version": "round-12-...", "tasks_scored": 1000, "labeled": 40,
     "timings": {"fetch_s": 0.4, "train_s": 3.1, "score_s": 2.0, "write_s": 1.8}, "finished_at": 1.7e9}
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isal_backend.queue.base import Outcome
from isal_backend.settings import Settings

_file_lock = threading.Lock()
_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class StatusStore:
    """Where status lives: a Redis client and key prefix, or (redis=None) a folder of JSON files."""

    redis: Any
    prefix: str
    folder: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> StatusStore:
        client = _redis(settings.redis_url) if settings.redis_url else None
        return cls(redis=client, prefix=settings.redis_prefix, folder=Path(settings.model_dir) / "status")

    def key(self, project_id: int) -> str:
        return f"{self.prefix}:status:{int(project_id)}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:status:projects"


def _redis(url: str) -> Any:
    """One client (connection pool) per URL per process."""
    import redis

    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=5)
            _clients[url] = client
        return client


def _store(settings: Settings | None) -> StatusStore:
    """Explicit settings win; inside a queue job, the job's own Redis/folder; else the environment."""
    if settings is not None:
        return StatusStore.from_settings(settings)
    from isal_backend.queue.context import current_job

    ctx = current_job()
    if ctx is not None and ctx.status_store is not None:
        return ctx.status_store
    return StatusStore.from_settings(Settings.from_env())


def _update(store: StatusStore, project_id: int, fieldname: str, value: dict[str, Any]) -> None:
    payload = json.dumps(value, default=str)
    if store.redis is not None:
        pipe = store.redis.pipeline()
        pipe.hset(store.key(project_id), fieldname, payload)
        pipe.sadd(store.index_key, int(project_id))
        pipe.execute()
        return
    path = store.folder / f"project-{int(project_id)}.json"
    with _file_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            current = {}
        current[fieldname] = json.loads(payload)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current))
        tmp.replace(path)


def _read_all(store: StatusStore) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    if store.redis is not None:
        ids = sorted(int(p) for p in store.redis.smembers(store.index_key))
        pipe = store.redis.pipeline()
        for pid in ids:
            pipe.hgetall(store.key(pid))
        for pid, raw in zip(ids, pipe.execute(), strict=True):
            out[pid] = {k.decode(): json.loads(v) for k, v in raw.items()}
        return out
    with _file_lock:
        for path in sorted(store.folder.glob("project-*.json")):
            try:
                out[int(path.stem.split("-", 1)[1])] = json.loads(path.read_text())
            except (ValueError, json.JSONDecodeError):
                continue
    return out


def record_round(project_id: int, report: dict[str, Any], settings: Settings | None = None) -> None:
    """Store a finished round's report (timings, tasks scored, model version) as the project's last round."""
    if not isinstance(report, dict):
        raise TypeError("report must be a dict")
    report = {**report}
    report.setdefault("finished_at", time.time())
    _update(_store(settings), project_id, "last_round", report)


def without_traceback(error: str) -> str:
    """The message of an error text: a Python traceback is cut to its last line (tracebacks stay in the log).

    Queues pass messages already; this also cleans what older versions stored, before it is served.
    """
    if "Traceback (most recent call last)" not in error:
        return error
    lines = [line for line in error.strip().splitlines() if line.strip() and not line.startswith((" ", "\t"))]
    return lines[-1].strip() if lines else "error (see the server log)"


def _clean(status: dict[str, Any]) -> dict[str, Any]:
    for name in ("last_job", "last_failure"):
        entry = status.get(name)
        if isinstance(entry, dict) and isinstance(entry.get("error"), str):
            status[name] = {**entry, "error": without_traceback(entry["error"])}
    return status


def record_job_outcome(
    project_id: int,
    kind: str,
    job_id: str,
    outcome: Outcome,
    error: str | None = None,
    settings: Settings | None = None,
    store: StatusStore | None = None,
    **extra: Any,
) -> None:
    """The queue records each job's end here (both queues, one :class:`Outcome` vocabulary).

    ``error`` is the failure's message (served by /status): a traceback passed here is cut to its last line.
    """
    entry = {"kind": kind, "job_id": job_id, "outcome": str(outcome), "at": time.time(), **extra}
    if error:
        entry["error"] = without_traceback(error)[:2000]
    store = store or _store(settings)
    _update(store, project_id, "last_job", entry)
    if Outcome(outcome).is_failure:
        _update(store, project_id, "last_failure", entry)


def last_rounds(settings: Settings | None = None) -> dict[int, dict[str, Any]]:
    """``{project_id: last round report}`` for every project that finished a round."""
    return {pid: st["last_round"] for pid, st in _read_all(_store(settings)).items() if "last_round" in st}


def project_status(project_id: int, settings: Settings | None = None) -> dict[str, Any]:
    """Everything known about one project: ``last_round``, ``last_job``, ``last_failure`` (each optional)."""
    return _clean(_read_all(_store(settings)).get(int(project_id), {}))


def all_status(settings: Settings | None = None) -> dict[int, dict[str, Any]]:
    """Status of every project (for /metrics)."""
    return _read_all(_store(settings))
