"""The backend's HTTP views: /health, /setup, /predict, /webhook, /versions, /metrics, /status, auth, errors.

Served on label-studio-ml's Flask app (:mod:`isal_backend.server.ls_ml` swaps its broken views for
these). Views only validate and hand over: events go to the queue, predictions to
:func:`isal_backend.jobs.entry.predict_tasks`; nothing here imports torch.
"""


from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException

from isal_backend.labelstudio.config import LabelConfigError, parse_project_config
from isal_backend.queue import ROUND, SCORE, Coalescer, make_coalescer
from isal_backend.server.ls_ml import patched_app
from isal_backend.server.metrics import WebhookMetrics, build_registry
from isal_backend.server.webhook import WebhookError, parse_webhook
from isal_backend.settings import Settings, SettingsError, configure_logging, save_project_credentials
from isal_backend.status import last_rounds, project_status

logger = logging.getLogger(__name__)
INITIAL_VERSION = "initial"
PUBLIC_ENDPOINTS = frozenset({"health"})


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _predict_tasks(project_id: int, tasks: list[dict[str, Any]], label_config: str) -> list[dict[str, Any]]:
    """Imported on first use: the web process answers /health and /webhook without loading torch."""
    from isal_backend.jobs.entry import predict_tasks

    return predict_tasks(project_id, tasks, label_config)


@dataclass
class AppState:
    settings: Settings
    coalescer: Coalescer
    registry: CollectorRegistry
    webhook_metrics: WebhookMetrics | None = None


def _state() -> AppState:
    return current_app.config["ISAL_STATE"]


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"error": message, "status": status}), status


def _json_body() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _project_id(value: Any) -> int:
    """Label Studio sends ``"<id>.<created_ts>"`` to /setup and /predict, an int elsewhere."""
    if isinstance(value, bool):
        raise ApiError(400, f"'project' must be a project id like 1 or '1.1795802474', got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        head = value.split(".", 1)[0]
        if head.isdigit() and int(head) > 0:
            return int(head)
    raise ApiError(400, f"'project' must be a project id like 1 or '1.1795802474', got {str(value)[:64]!r}")


def _model_version(project_id: int | None) -> str:
    try:
        rounds = last_rounds(_state().settings)
    except Exception:  # noqa: BLE001 - a status read problem must not fail /setup or /predict
        logger.warning("cannot read round status", exc_info=True)
        return INITIAL_VERSION
    report = rounds.get(project_id) if project_id is not None else None
    return str((report or {}).get("model_version") or INITIAL_VERSION)


# -- routes -----------------------------------------------------------------------------------------


def health() -> Response:
    s = _state().settings
    return jsonify({"status": "UP", "model_dir": str(s.model_dir), "v2": False,
                    "queue": "embedded" if s.embedded else "redis"})


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
    settings = _state().settings
    folder = settings.model_dir / "projects" / str(project_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "label_config.xml").write_text(schema)
    hostname, token = body.get("hostname"), body.get("access_token")
    if settings.label_studio_url is None or settings.label_studio_api_key is None:
        if isinstance(hostname, str) and hostname and isinstance(token, str) and token:
            save_project_credentials(settings, project_id, hostname, token)
        else:
            logger.warning("project %s: /setup carried no hostname/access_token and none is configured", project_id)
    return jsonify({"model_version": _model_version(project_id)})


def predict() -> Response:
    body = _json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ApiError(400, "'tasks' must be a list of task objects")
    project_id = _project_id(body.get("project"))
    label_config = body.get("label_config")
    if label_config is not None and not isinstance(label_config, str):
        raise ApiError(400, "'label_config' must be a string")
    if label_config is None:
        stored = _state().settings.model_dir / "projects" / str(project_id) / "label_config.xml"
        label_config = stored.read_text() if stored.exists() else None
    if label_config is None:
        raise ApiError(400, "'label_config' is missing and the project was never set up (/setup)")
    results = _predict_tasks(project_id, tasks, label_config)
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
        event = parse_webhook(request.get_json(force=True, silent=True))
        action = event.action
        jobs = []
        if event.retrain:
            jobs.append(state.coalescer.submit(ROUND, event.project_id))
        if event.score_task_ids:
            jobs.append(state.coalescer.submit(SCORE, event.project_id, list(event.score_task_ids)))
        result = "+".join(j.state for j in jobs) or "ignored"
        body: dict[str, Any] = {"action": action, "project": event.project_id, "status": result}
        if jobs:
            body["job_id"] = jobs[0].job_id
            body["jobs"] = [{"kind": j.kind, "job_id": j.job_id, "state": j.state} for j in jobs]
            return jsonify(body), 201
        return jsonify(body), 200
    except WebhookError as exc:
        result = "rejected"
        return _error(400, str(exc))
    finally:
        if state.webhook_metrics is not None:
            state.webhook_metrics.latency.observe(time.perf_counter() - started)
            state.webhook_metrics.events.labels(action, result).inc()


def versions() -> Response:
    body = request.get_json(force=True, silent=True) if request.method == "POST" else None
    raw = (body or {}).get("project") if isinstance(body, dict) else request.args.get("project")
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


def project_status_view(project_id: int) -> Response:
    """Per-project status: last round report, last job outcome, last failure, live queue state."""
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
    settings = current_app.config["ISAL_STATE"].settings
    if not settings.basic_auth_enabled or request.endpoint in PUBLIC_ENDPOINTS:
        return None
    header = request.headers.get("Authorization", "")
    ok = False
    if header.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        ok = hmac.compare_digest(user.encode(), (settings.basic_auth_user or "").encode()) & hmac.compare_digest(
            password.encode(), (settings.basic_auth_pass or "").encode()
        )
    if ok:
        return None
    response, status = _error(401, "authentication required")
    response.headers["WWW-Authenticate"] = 'Basic realm="isal-backend"'
    return response, status


def _handle_api_error(exc: ApiError) -> tuple[Response, int]:
    return _error(exc.status, exc.message)


def _handle_http(exc: HTTPException) -> tuple[Response, int]:
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
                "project_status": ("/status/<int:project_id>", project_status_view, ["GET"])},
        before_request=_check_basic_auth,
        error_handlers={ApiError: _handle_api_error, HTTPException: _handle_http, Exception: _handle_any},
        model_dir=str(settings.model_dir),
    )
    previous: AppState | None = app.config.get("ISAL_STATE")
    if previous is not None and previous.coalescer is not coalescer:
        previous.coalescer.close()
    state = AppState(settings=settings, coalescer=coalescer or make_coalescer(settings), registry=None)  # type: ignore[arg-type]
    state.registry, state.webhook_metrics = build_registry(state)
    app.config["ISAL_STATE"] = state
    app.config["JSON_SORT_KEYS"] = False
    logger.info("isal-backend app configured: %r", settings)
    return app
