"""Each project's active learning as it stands: the one summary ``/dashboard`` and ``python -m isal_backend status``
show.

Read from what rounds leave behind (the current round's report, the project's history, its thumbnails),
the status store (last job, last failure) and the queue's snapshot: no Label Studio call and no model
loaded, so a page view costs a few file reads and Redis round trips, and nothing here imports torch.
Free text that came from elsewhere (skip reasons, job errors) has any URL query value redacted, and no
token is ever read: the Label Studio link is the project's base URL only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from isal_backend.history import METRICS, STEPS, HistoryReader, freshness
from isal_backend.settings import Settings, SettingsError, project_credentials
from isal_backend.status import all_status, without_traceback
from isal_backend.thumbnails import Thumbnails
from isal_backend.times import parse_time

#: Rounds listed in a summary's timeline (the curve keeps every round).
TIMELINE_ROUNDS = 30
#: Skipped tasks and notes listed (their totals are always given).
SKIPPED_SHOWN, NOTES_SHOWN = 100, 20
#: Query parameters that are paths, not secrets (Label Studio's local-files storage: ``?d=``).
PUBLIC_QUERY_KEYS = frozenset({"d"})
_QUERY = re.compile(r"\?([^\s\"'<>`]+)")


def redact(text: Any, limit: int = 2000) -> str:
    """``text`` with the value of every URL query parameter replaced (presigned URLs carry secrets there)."""
    def clean(match: re.Match[str]) -> str:
        pieces = []
        for piece in match.group(1).split("&"):
            key, eq, _ = piece.partition("=")
            pieces.append(piece if eq and unquote(key) in PUBLIC_QUERY_KEYS else f"{key}=REDACTED" if eq
                          else "REDACTED")  # a bare ?token is a secret too
        return "?" + "&".join(pieces)

    return _QUERY.sub(clean, str(text))[:limit]


def base_url(url: str) -> str | None:
    """A Label Studio URL fit for a link: scheme, host, port and path; no user, password, query or fragment."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # an IPv6 literal
            netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    except ValueError:
        return None


def label_studio_url(settings: Settings, project_id: int) -> str | None:
    """The project's Label Studio base URL (from the environment or what /setup stored), or None."""
    try:
        return base_url(project_credentials(settings, project_id).url)
    except (SettingsError, OSError, ValueError):
        return None


def task_url(base: str | None, project_id: int, task_id: Any) -> str | None:
    """Where Label Studio opens the task (its Data Manager with the task in the labeling pane)."""
    return f"{base}/projects/{int(project_id)}/data?task={int(task_id)}" if base and isinstance(task_id, int) else None


def iso(value: Any) -> str | None:
    """A report time, or a Unix timestamp, as ISO-8601 UTC."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC).isoformat()
    parsed = parse_time(value)
    return parsed.isoformat() if parsed is not None else None


# -- the queue ---------------------------------------------------------------------------------------


def queue_state(snapshot: Mapping[str, Any] | None, project_id: int) -> dict[str, Any] | None:
    """The project's coalescing state: the running job, the waiting ones, events received and absorbed, job ends."""
    if snapshot is None:
        return None
    fields = snapshot.get("projects", {}).get(int(project_id), {})
    kinds = ("round", "score")

    def number(name: str) -> int:
        try:
            return int(float(fields.get(name, 0)))
        except (TypeError, ValueError):
            return 0

    ends: dict[str, int] = {}
    for name in fields:
        match = re.fullmatch(r"n_([a-z]+)_(round|score)", name)
        if match:
            ends[f"{match.group(2)} {match.group(1)}"] = number(name)
    running = fields.get("run_id")
    kind = fields.get("run_kind") or (str(running).split("-", 1)[0] if running else None)  # ids are kind-project-hex
    return {
        "running": running, "running_kind": kind if kind in kinds else None,
        "waiting": {k: fields.get(f"pend_{k}") for k in kinds},
        "events": {k: number(f"events_{k}") for k in kinds},
        "absorbed": {k: number(f"absorbed_{k}") for k in kinds},
        "ends": dict(sorted(ends.items())),
        "lost": {w: number(f"lost_{w}") for w in ("running", "waiting")},
    }


def embedded_workers(snapshot: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The embedded queue's worker threads (threads of the server process), busy ones first."""
    busy = int(snapshot.get("jobs", {}).get("started", 0))
    threads = max(int(snapshot.get("threads", 1)), busy)
    return [{"name": f"embedded worker {n + 1} (a thread of the server process)",
             "state": "busy" if n < busy else "idle"} for n in range(threads)]


def rq_workers(connection: Any, queue_name: str) -> list[dict[str, Any]]:
    """The RQ workers registered on the backend's queue (they heartbeat; a dead one drops out within minutes)."""
    from rq import Queue, Worker

    out = []
    for worker in sorted(Worker.all(queue=Queue(queue_name, connection=connection)), key=lambda w: w.name):
        out.append({
            "name": worker.name, "state": str(getattr(worker.get_state(), "value", worker.get_state())),
            "job": worker.get_current_job_id(), "host": worker.hostname, "pid": worker.pid,
            "last_heartbeat": iso(worker.last_heartbeat.timestamp()) if worker.last_heartbeat else None,
            "started": iso(worker.birth_date.timestamp()) if worker.birth_date else None,
            "succeeded": worker.successful_job_count, "failed": worker.failed_job_count,
        })
    return out


# -- projects ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _clean_job(entry: Any) -> dict[str, Any] | None:
    if not isinstance(entry, dict):
        return None
    out = {k: v for k, v in entry.items() if isinstance(v, str | int | float | bool) or v is None}
    if isinstance(out.get("error"), str):
        out["error"] = redact(without_traceback(out["error"]), 500)
    if "at" in out:
        out["at"] = iso(out["at"])
    return out


class Summaries:
    """Builds project summaries from one ``MODEL_DIR`` and status store; keeps a history reader between calls."""

    def __init__(self, settings: Settings, reader: HistoryReader | None = None) -> None:
        self.settings = settings
        self.reader = reader or HistoryReader()

    @property
    def projects_dir(self) -> Path:
        return Path(self.settings.model_dir) / "projects"

    def project_dir(self, project_id: int) -> Path:
        return self.projects_dir / str(int(project_id))

    def project_ids(self, snapshot: Mapping[str, Any] | None, statuses: Mapping[int, Any]) -> list[int]:
        """Projects with a round, a connection (/setup), a status or queue state."""
        ids = set(statuses) | set((snapshot or {}).get("projects", {}))
        if self.projects_dir.exists():
            for folder in self.projects_dir.iterdir():
                if folder.name.isdigit() and any((folder / n).exists() for n in ("CURRENT", "history.jsonl",
                                                                                   "label_config.xml")):
                    ids.add(int(folder.name))
        return sorted(int(i) for i in ids)

    def current_report(self, project_id: int) -> dict[str, Any] | None:
        folder = self.project_dir(project_id)
        try:
            round_id = (folder / "CURRENT").read_text().strip()
        except OSError:
            return None
        return _read_json(folder / "rounds" / round_id / "report.json") if round_id else None

    def project(self, project_id: int, snapshot: Mapping[str, Any] | None = None,
                statuses: Mapping[int, Any] | None = None) -> dict[str, Any]:
        """Everything the project page shows, JSON-ready."""
        pid = int(project_id)
        statuses = all_status(self.settings) if statuses is None else statuses
        status = statuses.get(pid, {})
        report = self.current_report(pid) or {}
        entries = self.reader.read(self.project_dir(pid))
        kind = report.get("kind") or next((e.get("kind") for e in reversed(entries) if e.get("kind")), None)
        metric_field, metric_label = METRICS.get(kind or "", (None, None))
        ls = label_studio_url(self.settings, pid)
        rounds = self._rounds(entries, metric_field)
        queue = queue_state(snapshot, pid)
        out: dict[str, Any] = {
            "project": pid, "kind": kind, "labels": report.get("labels") or [],
            "label_studio": {"project_url": f"{ls}/projects/{pid}/data"} if ls else None,
            "round": self._round(report, rounds), "order": self._order(report),
            "metric": {"field": metric_field, "label": metric_label, "value": report.get(metric_field or ""),
                       "validation": report.get("validation")} if metric_field else None,
            "curve": [{"round": r["round"], "round_id": r["round_id"], "model_version": r["model_version"],
                       "labeled": r["labeled"], "value": r["value"]} for r in rounds if r["value"] is not None],
            "rounds_total": len(rounds), "rounds": rounds[-TIMELINE_ROUNDS:],
            "classes": report.get("classes"),
            "stream": self._stream(pid, report, ls),
            "skipped": self._skipped(pid, report, ls),
            "queue": queue,
            "busy": bool(queue and (queue["running"] or queue["waiting"]["round"])),
            "last_job": _clean_job(status.get("last_job")),
            "last_failure": _clean_job(status.get("last_failure")),
        }
        return out

    @staticmethod
    def _rounds(entries: list[dict[str, Any]], metric_field: str | None) -> list[dict[str, Any]]:
        fresh = freshness(entries)
        rounds = []
        for i, (entry, seconds) in enumerate(zip(entries, fresh, strict=True)):
            timings = entry.get("timings") or {}
            value = entry.get(metric_field) if metric_field else None
            rounds.append({
                "round": i + 1, "round_id": entry.get("round_id"),
                "model_version": entry.get("model_version") or entry.get("round_id"),
                "finished_at": iso(entry.get("finished_at")), "labeled": entry.get("labeled"),
                "unlabeled": entry.get("unlabeled"), "written": entry.get("written"),
                "cold_start": bool(entry.get("cold_start_reason")) or str(entry.get("order", "")).startswith("cold"),
                "order": entry.get("order"), "value": value if isinstance(value, int | float) else None,
                "steps": {s: timings.get(f"{s}_seconds") for s in STEPS},
                "total": timings.get("total_seconds", entry.get("seconds")), "freshness": seconds,
                "skipped": entry.get("skipped"),
            })
        return rounds

    @staticmethod
    def _round(report: Mapping[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not report:
            return None
        last = next((r for r in reversed(rounds) if r["round_id"] == report.get("round_id")), None)
        return {
            "round_id": report.get("round_id"), "model_version": report.get("model_version"),
            "number": last["round"] if last else None, "finished_at": iso(report.get("finished_at")),
            "labeled": report.get("labeled"), "unlabeled": report.get("unlabeled"),
            "written": report.get("written"), "seconds": report.get("seconds"),
            "freshness": last["freshness"] if last else None,
        }

    @staticmethod
    def _order(report: Mapping[str, Any]) -> dict[str, Any] | None:
        if not report:
            return None
        strategy = report.get("strategy")
        options = report.get("strategy_options") or {}
        if report.get("cold_start_reason"):
            why = f"cold start: {report['cold_start_reason']}"
        elif str(report.get("order", "")).startswith("isal"):
            reference = ("cross-fitted: each label is in the reference set once, for a model that did not train "
                         "on it" if options.get("reference") == "crossfit" else "a held-out reference set")
            why = (f"{report.get('labeled')} labels give a model and a reference set ({reference}); each task is "
                   "ordered by how much labeling it would lower the loss on that set")
        elif report.get("order", "").startswith("none"):
            why = "no unlabeled task is left"
        else:
            why = f"ISAL_STRATEGY={strategy}: a baseline strategy was chosen instead of ISAL"
        return {"in_force": report.get("order"), "why": redact(why, 600), "strategy": strategy,
                "options": options, "note": report.get("strategy_note")}

    def _stream(self, project_id: int, report: Mapping[str, Any], ls: str | None) -> dict[str, Any] | None:
        """The stream's head as the round wrote it; ``thumbnail`` only where the round could make one."""
        head = report.get("stream_head")
        if not isinstance(head, list):
            return None
        thumbnails = Thumbnails.of_project(self.project_dir(project_id))
        items = []
        for item in head:
            if not isinstance(item, dict):
                continue
            key = item.get("thumbnail")
            items.append({"task": item.get("task"), "prelabel": redact(item.get("prelabel", ""), 200),
                          "score": item.get("score"), "key": item.get("key"),
                          "thumbnail": key if isinstance(key, str) and thumbnails.path(key) else None,
                          "url": task_url(ls, project_id, item.get("task"))})
        return {"key": report.get("stream_key"), "round_id": report.get("round_id"), "head": items}

    @staticmethod
    def _skipped(project_id: int, report: Mapping[str, Any], ls: str | None) -> dict[str, Any]:
        skipped = [s for s in report.get("skipped") or [] if isinstance(s, dict)]
        notes = [n for n in report.get("notes") or [] if isinstance(n, dict)]
        return {
            "total": len(skipped),
            "items": [{"task": s.get("task"), "reason": redact(s.get("reason", ""), 500),
                       "url": task_url(ls, project_id, s.get("task"))} for s in skipped[:SKIPPED_SHOWN]],
            "notes_total": len(notes),
            "notes": [{"task": n.get("task"), "kind": n.get("kind"), "message": redact(n.get("message", ""), 300)}
                      for n in notes[:NOTES_SHOWN]],
        }

    def overview(self, snapshot: Mapping[str, Any] | None, workers: list[dict[str, Any]] | None) -> dict[str, Any]:
        """Every project's summary, the queue's totals and the workers seen."""
        statuses = all_status(self.settings)
        projects = [self.project(pid, snapshot, statuses) for pid in self.project_ids(snapshot, statuses)]
        queue = None
        if snapshot is not None:
            queue = {"mode": snapshot.get("mode"), "name": snapshot.get("queue"),
                     "depth": snapshot.get("queue_depth"), "jobs": dict(snapshot.get("jobs") or {})}
        return {"generated_at": datetime.now(UTC).isoformat(), "projects": projects, "queue": queue,
                "workers": workers}


# -- the terminal ------------------------------------------------------------------------------------


def age(value: str | None, now: datetime | None = None) -> str:
    """``12 s ago``, ``3 min ago``, ``2 h ago``, ``4 d ago`` (empty when unknown)."""
    when = parse_time(value)
    if when is None:
        return ""
    seconds = max(0.0, ((now or datetime.now(UTC)) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def number(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def queue_text(queue: Mapping[str, Any] | None) -> str:
    if queue is None:
        return "unknown"
    text = f"running {queue.get('running_kind') or 'job'}" if queue["running"] else "idle"
    waiting = [k for k, v in queue["waiting"].items() if v]
    return text + (f", {' and '.join(waiting)} waiting" if waiting else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def short_order(text: Any) -> str:
    """``cold start``, ``isal``, or the baseline's name, from a report's ``order``."""
    text = str(text or "")
    return "cold start" if text.startswith("cold") else text.split(":")[0].split(" ")[0]


def order_short(summary: Mapping[str, Any]) -> str:
    return short_order((summary.get("order") or {}).get("in_force")) or "no round yet"


def format_overview(overview: Mapping[str, Any]) -> str:
    rows = []
    for p in overview["projects"]:
        current = p.get("round") or {}
        metric = p.get("metric") or {}
        failure = p.get("last_failure") or {}
        rows.append([p["project"], p.get("kind") or "", order_short(p), current.get("labeled"),
                     current.get("unlabeled"), number(metric.get("value"), 3),
                     metric.get("label") if metric.get("value") is not None else "", p["rounds_total"],
                     age(current.get("finished_at")), number(current.get("freshness"), 1), queue_text(p.get("queue")),
                     (failure.get("error") or "")[:60]])
    out = [table(["project", "kind", "order", "labeled", "pool", "metric", "of", "rounds", "last round",
                  "freshness s", "queue", "last failure"], rows) if rows else "no project yet"]
    queue = overview.get("queue")
    if queue:
        jobs = ", ".join(f"{k} {v}" for k, v in queue["jobs"].items())
        out.append(f"\nqueue {queue['name']} ({queue['mode']}): {queue['depth']} waiting; jobs: {jobs}")
    out.append(format_workers(overview.get("workers")))
    return "\n".join(out)


def format_workers(workers: list[dict[str, Any]] | None) -> str:
    if workers is None:
        return "workers: unknown here (the embedded queue runs in the server process; see /dashboard)"
    if not workers:
        return "workers: none seen on the queue"
    return "workers:\n" + table(["name", "state", "job", "last heartbeat"],
                                [[w["name"], w["state"], w.get("job") or "", age(w.get("last_heartbeat"))]
                                 for w in workers])


def format_project(p: Mapping[str, Any]) -> str:
    out = [f"project {p['project']} ({p.get('kind') or 'kind unknown'})"
           + (f"  Label Studio: {p['label_studio']['project_url']}" if p.get("label_studio") else "")]
    order, current, metric = p.get("order"), p.get("round"), p.get("metric") or {}
    if order is None or current is None:
        out.append("no round yet")
    else:
        out.append(f"order in force: {order['in_force']}\n  why: {order['why']}")
        if order.get("note"):
            out.append(f"  note: {order['note']}")
        out.append("  strategy: " + " ".join(f"{k}={v}" for k, v in order["options"].items()))
        fresh = f"; freshness {current['freshness']:.1f} s" if current.get("freshness") is not None else ""
        out.append(f"current round {current['number']}: {current['model_version']}, finished "
                   f"{current['finished_at']} ({age(current['finished_at'])}); {current['labeled']} labeled, "
                   f"{current['unlabeled']} in the pool, {current['written']} written{fresh}")
    if p["curve"]:
        out.append(f"\nlearning curve ({metric.get('label')}, one point per round)")
        out.append(table(["round", "labels", metric.get("label") or "value", "model version"],
                         [[c["round"], c["labeled"], number(c["value"], 4), c["model_version"]] for c in p["curve"]]))
    if p["rounds"]:
        out.append(f"\nrounds (last {len(p['rounds'])} of {p['rounds_total']}), seconds")
        out.append(table(["round", "finished", "labels", *STEPS, "total", "freshness"],
                         [[r["round"], r["finished_at"] or "", r["labeled"], *[number(r["steps"][s]) for s in STEPS],
                           number(r["total"]), number(r["freshness"], 1)] for r in p["rounds"]]))
    classes = p.get("classes")
    if classes:
        predicted = classes.get("pool_predicted") or {}
        out.append(f"\nclasses ({classes.get('unit')})")
        out.append(table(["class", "labeled", "pool, predicted"],
                         [[name, n, predicted.get(name, "")] for name, n in classes["labeled"].items()]))
    stream = p.get("stream")
    if stream and stream["head"]:
        key = stream.get("key") or "key"
        out.append(f"\nnext {len(stream['head'])} tasks of the stream")
        out.append(table(["#", "task", "pre-label", "score", key, "open in Label Studio"],
                         [[i + 1, s["task"], s["prelabel"], number(s["score"], 3), number(s["key"], 4),
                           s["url"] or ""] for i, s in enumerate(stream["head"])]))
    skipped = p["skipped"]
    if skipped["total"]:
        out.append(f"\nskipped ({skipped['total']})")
        out.append(table(["task", "reason"], [[s["task"], s["reason"]] for s in skipped["items"]]))
    if skipped["notes_total"]:
        out.append(f"notes: {skipped['notes_total']} repairs (see the round report)")
    queue = p.get("queue")
    out.append(f"\nqueue: {queue_text(queue)}" + (
        f"; events round {queue['events']['round']} (absorbed {queue['absorbed']['round']}), score "
        f"{queue['events']['score']} (absorbed {queue['absorbed']['score']})" if queue else ""))
    for name in ("last_job", "last_failure"):
        job = p.get(name)
        if job:
            out.append(f"{name.replace('_', ' ')}: {job.get('kind')} {job.get('outcome')} at {job.get('at')}"
                       + (f": {job['error']}" if job.get("error") else ""))
    if "workers" in p:
        out.append(format_workers(p["workers"]))
    return "\n".join(out)


def cli_queue(settings: Settings) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """The queue's snapshot and workers as this process can see them: Redis when REDIS_URL is set.

    The embedded queue lives in the server process: from a terminal its state is unknown (None).
    """
    if not settings.redis_url:
        return None, None
    import redis

    from isal_backend.queue.redis_queue import RedisCoalescer

    coalescer = RedisCoalescer.from_settings(settings)
    try:
        return coalescer.snapshot(), rq_workers(coalescer.redis, settings.rq_queue)
    except redis.exceptions.RedisError as exc:
        print(f"warning: the queue (Redis) cannot be read: {type(exc).__name__}", file=sys.stderr)
        return None, None
    finally:
        coalescer.close()


def main(args: argparse.Namespace) -> int:
    """``python -m isal_backend status [PROJECT] [--json]``."""
    settings = Settings.from_env()
    snapshot, workers = cli_queue(settings)
    summaries = Summaries(settings)
    if args.project is None:
        data = summaries.overview(snapshot, workers)
        text = format_overview(data)
    else:
        statuses = all_status(settings)
        if int(args.project) not in summaries.project_ids(snapshot, statuses):
            raise ValueError(f"project {args.project} is not known here (MODEL_DIR={settings.model_dir})")
        data = {**summaries.project(args.project, snapshot, statuses), "workers": workers}
        text = format_project(data)
    print(json.dumps(data, indent=2, default=str) if args.json else text)
    return 0
