"""The backend's HTTP app: label-studio-ml 1.0.9's Flask app with its broken parts replaced.

We keep label-studio-ml's app (``label_studio_ml.api``, initialised through ``init_app`` with a
``LabelStudioMLBase`` subclass) and its URL map, and replace, in this one module, what is broken in 1.0.9
(see ``../shared/docs/label-studio.md`` beside the repository):

1. ``RQJobManager.MAX_QUEUE_LEN = 1`` drops a second waiting job ("Maximal RQ queue len 1 reached"), so
   events are lost -> /webhook goes through :mod:`isal_backend.queue`: per project one job runs and one
   waits, a new event is absorbed by the waiting one, none is dropped.
2. Job ids are whole Unix seconds, so two events in one second collide -> uuid4 job ids.
3. ``job()`` looks the previous result up by the project's ``model_version`` (the backend title), never
   finds it (NoSuchJobError) and never loads the previous model -> no label-studio-ml job code is used;
   rounds are ``isal_backend.jobs.round.run_round(project_id)`` and keep their state under MODEL_DIR.
4. ``TRAIN_EVENTS`` lists ``ANNOTATION_DELETED`` (Label Studio sends ``ANNOTATIONS_DELETED``) and
   ``PROJECT_UPDATED`` (sent for the backend's own project PATCHes: a retrain loop) -> explicit tables in
   :mod:`isal_backend.server.webhook`; PROJECT_UPDATED is acknowledged without a job.
5. ``/webhook`` does ``request.json.pop('action')`` without validation: a bad body is a 500 or a crashed
   job -> validated, 400 with a message; the handler only validates and enqueues (Label Studio waits 1 s).
6. ``/versions`` serves only POST, Label Studio calls GET (405) -> GET and POST.
7. ``/metrics`` returns ``{}`` -> Prometheus text (queue depth, jobs by state, last rounds' timings).
8. Its before/after-request hooks log full request and response bodies at DEBUG, including /setup's
   ``access_token`` and the project ``token`` in every webhook -> removed.
9. ``exception_handler`` and its error handlers answer 500s with a Python traceback (plain text or
   JSON) -> JSON ``{"error": ...}`` bodies, tracebacks only in the server log.
10. ``/setup`` instantiates the model and loads "job results" per request, and ignores an invalid label
    config -> it validates the config (``isal_backend.labelstudio.config.parse_project_config``, 400 on
    LabelConfigError), stores hostname/access token (0600) for the jobs, and answers at once.
11. ``/predict`` needs a prior /setup in the same process (``_current_model``) and returns 500 otherwise
    -> stateless: ``isal_backend.jobs.predict.predict_tasks(project_id, tasks, label_config)``.
12. ``/train`` (pre-1.4 API) runs training synchronously in the request -> 410 Gone with a pointer.
13. No authentication -> optional HTTP basic auth on every route except /health.

(``label_studio_ml.model`` also imports ``torch.multiprocessing`` and sets the ``spawn`` start method at
import; harmless here, so it is left as is.)

The Flask app is a process-wide singleton in label-studio-ml; :func:`create_app` (re)configures it, so
one process serves one configuration.
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
from label_studio_ml import api as ls_api
from label_studio_ml.model import LabelStudioMLBase
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException

from isal_backend.queue import ROUND, SCORE, Coalescer, make_coalescer
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


def _import_predict() -> Any:
    try:
        from isal_backend.jobs.predict import predict_tasks
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("isal_backend.jobs"):
            raise ApiError(503, "prediction is not available: isal_backend.jobs.predict is not installed") from None
        raise
    return predict_tasks


class IsalModel(LabelStudioMLBase):
    """The model class label-studio-ml's app is initialised with; predictions come from the jobs package."""

    def predict(self, tasks: list[dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
        project = kwargs.get("project")
        return _import_predict()(_project_id(project), tasks, self.label_config)


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
        from isal_backend.labelstudio.config import parse_project_config
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("isal_backend.labelstudio"):
            raise
        logger.warning("isal_backend.labelstudio.config is missing: label config not validated")
    else:
        try:
            parse_project_config(schema)
        except ValueError as exc:  # LabelConfigError(ValueError), message names the tag
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
    results = _import_predict()(project_id, tasks, label_config)
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

_REPLACED = {
    "health": health, "_setup": setup, "_predict": predict, "webhook": webhook, "get_version": versions,
    "metrics": metrics, "_is_training": is_training, "_train": train_gone,
}


def _install(app: Flask) -> None:
    """Swap label-studio-ml's views, hooks and error handlers for ours (once per process)."""
    if app.config.get("ISAL_INSTALLED"):
        return
    for endpoint, view in _REPLACED.items():
        if endpoint not in app.view_functions:
            raise RuntimeError(f"label-studio-ml's app has no endpoint {endpoint!r}: version mismatch")
        app.view_functions[endpoint] = view
    app.add_url_rule("/versions", endpoint="get_version", view_func=versions, methods=["GET"])
    app.add_url_rule("/status/<int:project_id>", endpoint="project_status", view_func=project_status_view,
                     methods=["GET"])
    # Defect 8: body-logging hooks (they log tokens).
    for funcs in (app.before_request_funcs, app.after_request_funcs):
        for key, hooks in funcs.items():
            funcs[key] = [h for h in hooks if getattr(h, "__module__", "") != ls_api.__name__]
    # Defect 9: label-studio-ml's text/traceback error handlers.
    for handlers in app.error_handler_spec.get(None, {}).values():
        handlers.clear()
    app.before_request(_check_basic_auth)
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http)
    app.register_error_handler(Exception, _handle_any)
    app.config["ISAL_INSTALLED"] = True


def create_app(settings: Settings | None = None, coalescer: Coalescer | None = None) -> Flask:
    """The WSGI app for ``settings`` (default: the environment); reconfigures the process-wide app."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    app = ls_api.init_app(IsalModel, model_dir=str(settings.model_dir))
    _install(app)
    previous: AppState | None = app.config.get("ISAL_STATE")
    if previous is not None and previous.coalescer is not coalescer:
        previous.coalescer.close()
    state = AppState(settings=settings, coalescer=coalescer or make_coalescer(settings), registry=None)  # type: ignore[arg-type]
    state.registry, state.webhook_metrics = build_registry(state)
    app.config["ISAL_STATE"] = state
    app.config["JSON_SORT_KEYS"] = False
    logger.info("isal-backend app configured: %r", settings)
    return app
