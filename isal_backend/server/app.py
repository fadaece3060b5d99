"""The backend's HTTP views: /health, /setup, /predict, /webhook, /versions, /metrics, /status, auth, errors
(the /dashboard pages are in :mod:`isal_backend.server.dashboard`).

Served on label-studio-ml's Flask app (:mod:`isal_backend.server.ls_ml` swaps its broken views for
these). Views only validate and hand over: events go to the queue, predictions to
:func:`isal_backend.jobs.entry.predict_tasks`; nothing here imports torch.
"""


from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Flask, Response, current_app, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from isal_backend.labelstudio.client import LabelStudioAPIError, LabelStudioUnavailable
from isal_backend.labelstudio.config import LabelConfigError, parse_project_config
from isal_backend.labelstudio.mirror import request_resync
from isal_backend.queue import ROUND, SCORE, Coalescer, Submission, make_coalescer
from isal_backend.server.dashboard import ROUTES as DASHBOARD_ROUTES
from isal_backend.server.durable import JOURNALED, DurableSubmitter
from isal_backend.server.ls_link import ProjectLinks, SetupRefused
from isal_backend.server.ls_ml import patched_app
from isal_backend.server.metrics import WebhookMetrics, build_registry
from isal_backend.server.webhook import ANNOTATOR_ACTIONS, MAX_ID, WebhookError, parse_webhook, shown
from isal_backend.settings import Settings, SettingsError, configure_logging, project_credentials
from isal_backend.status import last_rounds, project_status

logger = logging.getLogger(__name__)
#: Events after which the next round rereads every task from Label Studio instead of only what changed.
FULL_RESYNC_ACTIONS = frozenset({"START_TRAINING"})
INITIAL_VERSION = "initial"
PUBLIC_ENDPOINTS = frozenset({"health"})
#: Deeper JSON is refused (400): Label Studio's bodies nest about 6 levels, and deep nesting is how a small
#: body makes the JSON parser (or any later walk) exhaust Python's recursion limit.
MAX_JSON_DEPTH = 100
# [0-9] rather than \d: \d matches any Unicode digit ("３", "³"), which int() then reads or refuses.
_PROJECT_ID = re.compile(r"([0-9]{1,18})(?:\.[0-9]{1,20})?")


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _predict_tasks(project_id: int, tasks: list[dict[str, Any]], label_config: str) -> list[dict[str, Any]]:
    """Imported on first use: the web process answers /health and /webhook without loading torch."""
    from isal_backend.jobs.entry import predict_tasks

    return predict_tasks(project_id, tasks, label_config, _state().settings)


@dataclass
class AppState:
    settings: Settings
    coalescer: Coalescer
    registry: CollectorRegistry
    submitter: DurableSubmitter
    links: ProjectLinks
    webhook_metrics: WebhookMetrics | None = None

    def close(self) -> None:
        self.submitter.close()
        self.links.close()
        self.coalescer.close()


def _state() -> AppState:
    return current_app.config["ISAL_STATE"]


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"error": message, "status": status}), status


def _body_limit() -> int:
    return _state().settings.max_body_mb * 1024 * 1024


def _raw_body() -> bytes:
    """The request body, read at most once and never past ISAL_MAX_BODY_MB (413), chunked bodies included."""
    cached = g.get("isal_body")
    if cached is not None:
        return cached
    limit = _body_limit()
    if request.content_length is not None and request.content_length > limit:
        raise _too_large()
    try:
        data = request.stream.read(limit + 1)
        # Werkzeug 3 caps a chunked stream at MAX_CONTENT_LENGTH itself: one more byte tells a body that ends
        # at the limit from one cut there (the cap raises RequestEntityTooLarge).
        if len(data) > limit or (len(data) == limit and request.stream.read(1)):
            raise _too_large()
    except RequestEntityTooLarge:
        raise _too_large() from None
    g.isal_body = data
    return data


def _too_large() -> ApiError:
    mb = _state().settings.max_body_mb
    return ApiError(413, f"the request body is larger than {mb} MB (ISAL_MAX_BODY_MB={mb})")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _bracket_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside JSON strings (vectorised: bodies may be megabytes)."""
    raw = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    if raw.size == 0:
        return 0
    steps = np.isin(raw, (ord("["), ord("{"))).astype(np.int64) - np.isin(raw, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def _check_depth(value: Any) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH, without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _json_value(allow_empty: bool = False) -> Any:
    """The body parsed as JSON: 415 unless sent as JSON, 400 naming what is wrong with it."""
    if not request.is_json:
        if allow_empty and not _raw_body():
            return None
        shown = (request.headers.get("Content-Type") or "none")[:100]
        raise ApiError(415, f"the body must be JSON sent with Content-Type: application/json (got {shown!r})")
    data = _raw_body()
    if allow_empty and not data.strip():
        return None
    if _bracket_depth(data) > MAX_JSON_DEPTH:  # before parsing: a deep body must not reach the recursive parser
        raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(data)
    except RecursionError:
        raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, integers too long to read
        raise ApiError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None
    _check_depth(body)
    return body


def _json_body() -> dict[str, Any]:
    body = _json_value()
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _project_id(value: Any) -> int:
    """Label Studio sends ``"<id>.<created_ts>"`` to /setup and /predict, an int elsewhere; ASCII digits only."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 < value <= MAX_ID:
            return value
    elif isinstance(value, str):
        match = _PROJECT_ID.fullmatch(value)
        if match and 0 < int(match.group(1)) <= MAX_ID:
            return int(match.group(1))
    raise ApiError(400, f"'project' must be a project id like 1 or '1.1795802474' (ASCII digits), got "
                        f"{shown(value, 64)}")


def _last_round(project_id: int | None) -> dict[str, Any]:
    """The project's last round report in the status store ({} when none or unreadable)."""
    try:
        rounds = last_rounds(_state().settings)
    except Exception:  # noqa: BLE001 - a status read problem must not fail /setup or /predict
        logger.warning("cannot read round status", exc_info=True)
        return {}
    return (rounds.get(project_id) if project_id is not None else None) or {}


def _model_version(project_id: int | None) -> str:
    return str(_last_round(project_id).get("model_version") or INITIAL_VERSION)


def has_round(settings: Settings, project_id: int) -> bool:
    """Whether a round was ever committed for the project (the model store's ``CURRENT``; read without
    :mod:`isal_backend.store`, which imports torch)."""
    return (settings.model_dir / "projects" / str(int(project_id)) / "CURRENT").is_file()


def _round_queued(state: AppState, project_id: int) -> bool:
    """A round of the project runs or waits (a queue that cannot tell counts as none: the coalescer absorbs)."""
    try:
        fields = state.coalescer.snapshot()["projects"].get(project_id, {})
    except Exception:  # noqa: BLE001 - Redis down: the submitter journals the event
        return False
    return bool(fields.get(f"pend_{ROUND}")) or str(fields.get("run_id") or "").startswith(f"{ROUND}-")


def first_round(state: AppState, project_id: int, action: str) -> Submission | None:
    """Start the cold-start round of a project that has none yet, so the first task Label Studio serves is
    the cold-start order's first and not the lowest task id; None when a round exists, runs or waits.

    Label Studio calls /setup often (every /predict, the settings page): once a round exists, or one is
    under way, nothing more is queued."""
    if has_round(state.settings, project_id) or _round_queued(state, project_id):
        return None
    if action == "/setup" and _last_round(project_id).get("committed") is False:
        return None  # the last round found no task: the import's TASKS_CREATED starts the next one
    logger.info("project %s: no round yet; %s starts the cold-start round", project_id, action)
    return state.submitter.submit(ROUND, project_id, action=action)


# -- routes -----------------------------------------------------------------------------------------


def health() -> Response:
    """Always 200 while the server runs (Label Studio disconnects a backend whose /health fails); the body says
    whether the queue is ``ok`` or ``degraded`` (Redis down: webhooks are journaled meanwhile)."""
    state = _state()
    s = state.settings
    queue = state.submitter.health()
    return jsonify({"status": "UP", "model_dir": str(s.model_dir), "v2": False,
                    "queue": "embedded" if s.embedded else "redis", "queue_state": queue["state"],
                    **({"queue_detail": queue} if queue["state"] != "ok" else {})})


def setup() -> Response:
    body = _json_body()
    project_id = _project_id(body.get("project"))
    schema = body.get("schema")
    if not isinstance(schema, str) or not schema.strip():
        raise ApiError(400, "'schema' must be the project's label config (XML string)")
    try:
        parse_project_config(schema)
    except LabelConfigError as exc:  # the message names the tag
        raise ApiError(400, f"unsupported label config: {exc}") from None
    state = _state()
    try:
        credentials = state.links.setup(project_id, body.get("hostname"), body.get("access_token"), request.host,
                                        on_verified=lambda: first_round(state, project_id, "/setup"))
    except SetupRefused as exc:
        logger.warning("project %s: /setup refused: %s", project_id, exc)
        raise ApiError(exc.status, str(exc)) from None
    folder = state.settings.model_dir / "projects" / str(project_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "label_config.xml").write_text(schema)
    answer: dict[str, Any] = {"model_version": _model_version(project_id), "credentials": credentials.state,
                              "message": credentials.message}
    if credentials.state != "verifying":  # usable credentials: the round can read Label Studio
        job = first_round(state, project_id, "/setup")
        if job is not None:
            answer["round"] = {"job_id": job.job_id, "state": job.state}
    return jsonify(answer)


def _predict_request(body: dict[str, Any]) -> tuple[int, list[dict[str, Any]], str]:
    """Check everything a prediction needs before any model code runs; ApiError naming what is wrong."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise ApiError(400, "'tasks' must be a list of task objects")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise ApiError(400, f"tasks[{i}] must be a JSON object, got {type(task).__name__}")
        task_id = task.get("id")
        if not isinstance(task_id, int) or isinstance(task_id, bool) or not 0 < task_id <= MAX_ID:
            raise ApiError(400, f"tasks[{i}].id must be a positive integer, got {shown(task_id)}")
        if not isinstance(task.get("data"), dict):
            raise ApiError(400, f"tasks[{i}].data must be a JSON object, got {type(task.get('data')).__name__}")
    project_id = _project_id(body.get("project"))
    label_config = body.get("label_config")
    if label_config is not None and not isinstance(label_config, str):
        raise ApiError(400, "'label_config' must be a string")
    if label_config is None:
        stored = _state().settings.model_dir / "projects" / str(project_id) / "label_config.xml"
        label_config = stored.read_text() if stored.exists() else None
    if label_config is None:
        raise ApiError(400, "'label_config' is missing and the project was never set up (/setup)")
    try:
        parse_project_config(label_config)
    except LabelConfigError as exc:
        raise ApiError(400, f"unsupported label config: {exc}") from None
    try:
        project_credentials(_state().settings, project_id)
    except SettingsError as exc:
        raise ApiError(400, str(exc)) from None
    return project_id, tasks, label_config


def predict() -> Response:
    project_id, tasks, label_config = _predict_request(_json_body())
    try:
        results = _predict_tasks(project_id, tasks, label_config)
    except (SettingsError, LabelConfigError) as exc:
        raise ApiError(400, str(exc)) from None
    except LabelStudioAPIError as exc:  # Label Studio refused (a bad key, a project it does not have): not ours to fix
        raise ApiError(424, f"Label Studio refused a request for this prediction: {exc}") from None
    except LabelStudioUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    if not isinstance(results, list) or len(results) != len(tasks):
        raise ApiError(500, "predict_tasks returned a result count different from the task count")
    version = next((r.get("model_version") for r in results if isinstance(r, dict) and r.get("model_version")), None)
    return jsonify({"results": results, "model_version": str(version or _model_version(project_id))})


def webhook() -> tuple[Response, int]:
    state = _state()
    started = time.perf_counter()
    action = "invalid"
    result = "error"
    try:
        try:
            event = parse_webhook(_json_value())
        except ApiError:
            result = "rejected"
            raise
        action = event.action
        if action in ANNOTATOR_ACTIONS:
            state.submitter.note_activity(event.project_id)
        jobs = []
        if action in FULL_RESYNC_ACTIONS:  # the user asked for a fresh look: the round rereads every task
            request_resync(state.settings.model_dir / "projects" / str(event.project_id))
        if event.score_task_ids and not has_round(state.settings, event.project_id):
            # Nothing to score new tasks against yet: the cold-start round orders them (and covers any labels).
            jobs.append(state.submitter.submit(ROUND, event.project_id, action=action))
        else:
            if event.retrain:
                jobs.append(state.submitter.submit(ROUND, event.project_id, action=action))
            if event.score_task_ids:
                jobs.append(state.submitter.submit(SCORE, event.project_id, list(event.score_task_ids),
                                                   action=action))
        result = "+".join(j.state for j in jobs) or "ignored"
        body: dict[str, Any] = {"action": action, "project": event.project_id, "status": result}
        if any(j.state == JOURNALED for j in jobs):
            # Redis is down: the event is on disk and is queued once Redis answers (202: accepted, not yet queued).
            body["queue"] = "degraded"
            return jsonify(body), 202
        if jobs:
            body["job_id"] = jobs[0].job_id
            body["jobs"] = [{"kind": j.kind, "job_id": j.job_id, "state": j.state} for j in jobs]
            return jsonify(body), 201
        return jsonify(body), 200
    except WebhookError as exc:
        result = "rejected"
        return _error(400, str(exc))
    except OSError as exc:  # the journal could not be written either
        logger.error("webhook: Redis is unavailable and the event could not be journaled: %r", exc)
        return _error(503, "the job queue (Redis) is unavailable and the event could not be journaled")
    finally:
        if state.webhook_metrics is not None:
            state.webhook_metrics.latency.observe(time.perf_counter() - started)
            state.webhook_metrics.events.labels(action, result).inc()


def versions() -> Response:
    body = _json_value(allow_empty=True) if request.method == "POST" else None
    if body is not None and not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    raw = body.get("project") if isinstance(body, dict) else request.args.get("project")
    project_id = _project_id(raw) if raw is not None else None
    rounds = last_rounds(_state().settings)
    found = [
        str(r["model_version"]) for pid, r in sorted(rounds.items())
        if r.get("model_version") and (project_id is None or pid == project_id)
    ]
    return jsonify({"versions": found, "model_dir": str(_state().settings.model_dir), "v2": False})


def metrics() -> Response:
    return Response(generate_latest(_state().registry), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})


def is_training() -> Response:
    raw = request.args.get("project")
    if raw is None:
        raise ApiError(400, "query parameter 'project' is required")
    project_id = _project_id(raw)
    fields = _state().coalescer.snapshot()["projects"].get(project_id, {})
    return jsonify({"is_training": bool(fields.get("run_id")), "model_version": _model_version(project_id)})


def project_status_view(project_id: str) -> Response:
    """Per-project status: last round report, last job outcome, last failure, live queue state."""
    project_id = _project_id(project_id)  # type: ignore[assignment]
    fields = _state().coalescer.snapshot()["projects"].get(project_id, {})
    queue = {
        "running": fields.get("run_id"),
        "waiting": {k: fields.get(f"pend_{k}") for k in (ROUND, SCORE)},
        "events": {k: int(fields.get(f"events_{k}", 0)) for k in (ROUND, SCORE)},
    }
    return jsonify({"project": project_id, "queue": queue, **project_status(project_id, _state().settings)})


def train_gone() -> tuple[Response, int]:
    return _error(410, "/train was removed in Label Studio 1.4.1: training starts from /webhook (START_TRAINING)")


# -- auth and errors --------------------------------------------------------------------------------


def _check_basic_auth() -> tuple[Response, int] | None:
    """Basic auth on every route but /health; the scheme is case-insensitive (RFC 7235), so is ``basic``."""
    settings = current_app.config["ISAL_STATE"].settings
    if not settings.basic_auth_enabled or request.endpoint in PUBLIC_ENDPOINTS:
        return None
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    ok = False
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            user, password = "", ""
        ok = hmac.compare_digest(user.encode(), (settings.basic_auth_user or "").encode()) & hmac.compare_digest(
            password.encode(), (settings.basic_auth_pass or "").encode()
        )
    if ok:
        return None
    response, status = _error(401, "authentication required")
    response.headers["WWW-Authenticate"] = 'Basic realm="isal-backend"'
    return response, status


def _before_request() -> tuple[Response, int] | None:
    """Auth first (nothing of an unauthenticated body is read), then the body size limit, then the replayer."""
    denied = _check_basic_auth()
    if denied is not None:
        return denied
    state: AppState = current_app.config["ISAL_STATE"]
    if request.content_length is not None and request.content_length > state.settings.max_body_mb * 1024 * 1024:
        return _handle_api_error(_too_large())
    state.submitter.ensure_started()
    return None


def _handle_api_error(exc: ApiError) -> tuple[Response, int]:
    return _error(exc.status, exc.message)


def _handle_http(exc: HTTPException) -> tuple[Response, int]:
    if exc.code == 413:
        return _handle_api_error(_too_large())
    return _error(exc.code or 500, exc.description or exc.name)


def _handle_any(exc: Exception) -> tuple[Response, int]:
    import redis

    if isinstance(exc, redis.exceptions.RedisError):
        logger.error("queue unavailable: %r", exc)
        return _error(503, "the job queue (Redis) is unavailable")
    if isinstance(exc, SettingsError):
        logger.error("%s", exc)
        return _error(500, str(exc))
    logger.exception("unhandled error on %s %s", request.method, request.path)
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")


# -- wiring -----------------------------------------------------------------------------------------

def create_app(settings: Settings | None = None, coalescer: Coalescer | None = None) -> Flask:
    """The WSGI app for ``settings`` (default: the environment); reconfigures the process-wide app."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    app = patched_app(
        views={"health": health, "_setup": setup, "_predict": predict, "webhook": webhook, "get_version": versions,
               "metrics": metrics, "_is_training": is_training, "_train": train_gone},
        routes={"get_version_get": ("/versions", versions, ["GET"]),
                "project_status": ("/status/<project_id>", project_status_view, ["GET"]), **DASHBOARD_ROUTES},
        before_request=_before_request,
        error_handlers={ApiError: _handle_api_error, HTTPException: _handle_http, Exception: _handle_any},
        model_dir=str(settings.model_dir),
    )
    previous: AppState | None = app.config.get("ISAL_STATE")
    if previous is not None:
        previous.submitter.close()
        previous.links.close()
        if previous.coalescer is not coalescer:
            previous.coalescer.close()
    coalescer = coalescer or make_coalescer(settings)
    state = AppState(settings=settings, coalescer=coalescer, registry=None,  # type: ignore[arg-type]
                     submitter=DurableSubmitter(coalescer, settings), links=ProjectLinks(settings))
    state.registry, state.webhook_metrics = build_registry(state)
    state.submitter.ensure_started()  # the journal replayer and reconciliation run without waiting for a request
    app.config["ISAL_STATE"] = state
    app.json.sort_keys = False  # answers keep the order they were built in
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_mb * 1024 * 1024
    logger.info("isal-backend app configured: %r", settings)
    return app
