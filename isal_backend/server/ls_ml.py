"""label-studio-ml 1.0.9's Flask app, with its broken parts replaced by the backend's own views.

We keep label-studio-ml's app (``label_studio_ml.api``, initialised through ``init_app`` with a
``LabelStudioMLBase`` subclass) and its URL map, so Label Studio finds every route where it expects it,
and :func:`patched_app` replaces, in this one module, what is broken in 1.0.9 (see
``docs/label-studio.md`` in the project's shared notes). The views themselves live in
:mod:`isal_backend.server.app`; this module only knows label-studio-ml.

1. ``RQJobManager.MAX_QUEUE_LEN = 1`` drops a second waiting job ("Maximal RQ queue len 1 reached"), so
   events are lost -> /webhook goes through :mod:`isal_backend.queue`: per project one job runs and one
   waits, a new event is absorbed by the waiting one, none is dropped.
2. Job ids are whole Unix seconds, so two events in one second collide -> uuid4 job ids.
3. ``job()`` looks the previous result up by the project's ``model_version`` (the backend title), never
   finds it (NoSuchJobError) and never loads the previous model -> no label-studio-ml job code is used;
   rounds are :func:`isal_backend.jobs.entry.run_round` and keep their state under MODEL_DIR.
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
    config -> it validates the config and stores hostname/access token (0600) for the jobs once Label Studio
    accepts them (:mod:`isal_backend.server.ls_link`).
11. ``/predict`` needs a prior /setup in the same process (``_current_model``) and returns 500 otherwise
    -> stateless: :func:`isal_backend.jobs.entry.predict_tasks`.
12. ``/train`` (pre-1.4 API) runs training synchronously in the request -> 410 Gone with a pointer.
13. No authentication -> optional HTTP basic auth on every route except /health.

(``label_studio_ml.model`` also imports ``torch.multiprocessing`` and sets the ``spawn`` start method at
import; harmless here, so it is left as is.)

The Flask app is a process-wide singleton in label-studio-ml: one process serves one configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask
from label_studio_ml import api as ls_api
from label_studio_ml.model import LabelStudioMLBase

#: label-studio-ml's endpoint names, each replaced by one of the backend's views (defects 1-12).
REPLACED_ENDPOINTS = ("health", "_setup", "_predict", "webhook", "get_version", "metrics", "_is_training", "_train")


class IsalModel(LabelStudioMLBase):
    """The model class label-studio-ml's app must be initialised with; our views never call it."""


def patched_app(
    views: Mapping[str, Callable[..., Any]],
    routes: Mapping[str, tuple[str, Callable[..., Any], list[str]]],
    before_request: Callable[[], Any],
    error_handlers: Mapping[type[BaseException], Callable[..., Any]],
    model_dir: str,
) -> Flask:
    """label-studio-ml's app with ``views`` in place of its endpoints, ``routes`` added, its hooks gone.

    ``views`` maps each of :data:`REPLACED_ENDPOINTS` to our view; ``routes`` maps an endpoint name to
    ``(rule, view, methods)``. Installed once per process; later calls only return the app.
    """
    app = ls_api.init_app(IsalModel, model_dir=model_dir)
    if app.config.get("ISAL_INSTALLED"):
        return app
    missing = set(REPLACED_ENDPOINTS) - set(views)
    if missing:
        raise ValueError(f"no view given for label-studio-ml endpoints {sorted(missing)}")
    for endpoint in REPLACED_ENDPOINTS:
        if endpoint not in app.view_functions:
            raise RuntimeError(f"label-studio-ml's app has no endpoint {endpoint!r}: version mismatch")
        app.view_functions[endpoint] = views[endpoint]
    for endpoint, (rule, view, methods) in routes.items():
        app.add_url_rule(rule, endpoint=endpoint, view_func=view, methods=methods)
    # Defect 8: body-logging hooks (they log tokens).
    for funcs in (app.before_request_funcs, app.after_request_funcs):
        for key, hooks in funcs.items():
            funcs[key] = [h for h in hooks if getattr(h, "__module__", "") != ls_api.__name__]
    # Defect 9: label-studio-ml's text/traceback error handlers.
    for handlers in app.error_handler_spec.get(None, {}).values():
        handlers.clear()
    app.before_request(before_request)
    for kind, handler in error_handlers.items():
        app.register_error_handler(kind, handler)
    app.config["ISAL_INSTALLED"] = True
    return app
