"""The dashboard: ``/dashboard`` (every project) and ``/dashboard/<project>``, HTML rendered on the server.

Readable without JavaScript (the page has none, and its Content-Security-Policy allows none), nothing
fetched from elsewhere, behind the app's basic auth like every route but /health. While a project's
round runs or waits the page reloads itself every :data:`BUSY_REFRESH` seconds (a meta refresh),
otherwise every :data:`IDLE_REFRESH`; ``?refresh=0`` stops it.

What it shows comes from :mod:`isal_backend.summary` (the rounds' reports and history, the status
store, the queue's snapshot): a view asks Label Studio nothing and loads no model. The plots are SVG
drawn by :mod:`isal_backend.server.plots`; the thumbnails are the ones the rounds made, served by their hash only.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Response, current_app, request
from jinja2 import Environment, FileSystemLoader, select_autoescape

from isal_backend.history import METRICS, STEPS, HistoryReader
from isal_backend.server.plots import cached, classes_svg, curve_svg, timeline_svg
from isal_backend.status import all_status
from isal_backend.summary import Summaries, embedded_workers, order_short, queue_text, rq_workers, short_order
from isal_backend.thumbnails import Thumbnails

BUSY_REFRESH, IDLE_REFRESH = 5, 30
PLOTS = ("curve", "timeline", "classes")
#: No script at all, images only from here, the page's own styles; no framing, no form posts.
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
_PROJECT = re.compile(r"[0-9]{1,18}")  # ASCII digits only, as everywhere in the app
_reader = HistoryReader()


def _when(value: Any) -> str:
    text = str(value or "")
    if not text:
        return ""
    return text[:19].replace("T", " ") + " UTC"


def _num(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _sci(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "), default=str)


_templates = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                         autoescape=select_autoescape(default=True, default_for_string=True), auto_reload=False)
_templates.filters.update(when=_when, num=_num, pct=_pct, sci=_sci, compact=_compact, short_order=short_order)


def _state() -> Any:
    return current_app.config["ISAL_STATE"]


def _summaries() -> Summaries:
    return Summaries(_state().settings, _reader)


def _queue() -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """The queue's snapshot and the workers seen (None where Redis cannot be read: the page still answers)."""
    state = _state()
    try:
        snapshot = state.coalescer.snapshot()
    except Exception:  # noqa: BLE001 - Redis down: the page shows what the files say
        current_app.logger.warning("dashboard: cannot read the queue state", exc_info=True)
        return None, None
    if snapshot.get("mode") == "embedded":
        return snapshot, embedded_workers(snapshot)
    try:
        return snapshot, rq_workers(state.coalescer.redis, state.settings.rq_queue)
    except Exception:  # noqa: BLE001
        current_app.logger.warning("dashboard: cannot list the RQ workers", exc_info=True)
        return snapshot, None


def _overall(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {"mode": snapshot.get("mode"), "name": snapshot.get("queue"), "depth": snapshot.get("queue_depth"),
            "jobs": dict(snapshot.get("jobs") or {})}


def _refresh(busy: bool) -> int:
    raw = request.args.get("refresh")
    if raw is not None and raw.isascii() and raw.isdigit():
        return min(int(raw), 3600)
    return BUSY_REFRESH if busy else IDLE_REFRESH


def _html(template: str, status: int = 200, **context: Any) -> Response:
    body = _templates.get_template(template).render(base=request.script_root, steps=STEPS, **context)
    response = Response(body, status=status, mimetype="text/html")
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _not_found(message: str) -> Response:
    return Response(message, status=404, mimetype="text/plain", headers={"X-Content-Type-Options": "nosniff"})


def _project_id(raw: str) -> int | None:
    return int(raw) if _PROJECT.fullmatch(raw) and int(raw) > 0 else None


# -- views -------------------------------------------------------------------------------------------


def overview() -> Response:
    """Every project: order, labels, validation, rounds, freshness, queue; the queue and its workers."""
    snapshot, workers = _queue()
    data = _summaries().overview(snapshot, workers)
    rows = [{"summary": p, "order": order_short(p), "queue": queue_text(p["queue"])} for p in data["projects"]]
    busy = any(p["busy"] for p in data["projects"])
    return _html("overview.html", projects=rows, queue=_overall(snapshot), workers=workers,
                 generated_at=data["generated_at"], refresh=_refresh(busy), p=None)


def project(project_id: str) -> Response:
    """One project's active learning, section by section (see the module docstring of summary)."""
    pid = _project_id(project_id)
    summaries = _summaries()
    snapshot, workers = _queue()
    statuses = all_status(_state().settings)
    if pid is None or pid not in summaries.project_ids(snapshot, statuses):
        return _not_found(f"no project {project_id[:20]!r} here")
    p = summaries.project(pid, snapshot, statuses)
    version = (p["round"] or {}).get("round_id") or "none"
    return _html("project.html", p=p, current=p["round"], order=p["order"], metric=p["metric"],
                 order_short=order_short(p), queue_text=queue_text(p["queue"]), queue=_overall(snapshot),
                 workers=workers, version=f"{version}-{p['rounds_total']}",
                 generated_at=datetime.now(UTC).isoformat(), refresh=_refresh(p["busy"]))


def plot(project_id: str, name: str) -> Response:
    """One of the project's plots as SVG, drawn once per round (cached)."""
    pid = _project_id(project_id)
    if pid is None or name not in PLOTS:
        return _not_found("no such plot")
    summaries = _summaries()
    report = summaries.current_report(pid) or {}
    p = summaries.project(pid, None, {})
    if not report and not p["rounds_total"]:
        return _not_found("no round of this project yet")
    key = (str(_state().settings.model_dir), pid, name, p["rounds_total"], report.get("round_id"))
    if name == "curve":
        label = (p["metric"] or {}).get("label") or METRICS["classification"][1]
        svg = cached(key, lambda: curve_svg(p["curve"], label, p["kind"]))
    elif name == "timeline":
        svg = cached(key, lambda: timeline_svg(p["rounds"]))
    else:
        svg = cached(key, lambda: classes_svg(p["classes"] or {}))
    return Response(svg, mimetype="image/svg+xml", headers={"Cache-Control": "private, max-age=5",
                                                            "X-Content-Type-Options": "nosniff",
                                                            "Content-Security-Policy": CSP})


def thumbnail(project_id: str, key: str) -> Response:
    """A stream head's thumbnail by its hash (never by URL); made by the round, read from disk."""
    pid = _project_id(project_id)
    path = Thumbnails.of_project(_summaries().project_dir(pid)).path(key) if pid is not None else None
    if path is None:
        return _not_found("no such thumbnail")
    return Response(path.read_bytes(), mimetype="image/jpeg",
                    headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"})


#: ``endpoint: (rule, view, methods)``, added to the app by :func:`isal_backend.server.app.create_app`.
ROUTES = {
    "dashboard": ("/dashboard", overview, ["GET"]),
    "dashboard_project": ("/dashboard/<project_id>", project, ["GET"]),
    "dashboard_plot": ("/dashboard/<project_id>/<name>.svg", plot, ["GET"]),
    "dashboard_thumbnail": ("/dashboard/<project_id>/thumbnails/<key>.jpg", thumbnail, ["GET"]),
}
