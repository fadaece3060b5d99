"""Prometheus metrics for /metrics, read at scrape time from the queue and the per-project status.

Jobs run in other processes, so nothing here is a process-local counter except the webhook's own
request figures. Only numbers, project ids, kinds, validated actions and timing phase names are
exported: no body field, URL, key or token can reach a label.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from isal_backend.queue.base import Outcome
from isal_backend.status import all_status

logger = logging.getLogger(__name__)
_PHASE = re.compile(r"[^a-zA-Z0-9_]")
_OUTCOME_FIELD = re.compile(r"n_([a-z]+)_(round|score)")


def _phase(name: str) -> str:
    return _PHASE.sub("_", str(name))[:40] or "unnamed"


class QueueCollector:
    """Queue depth, jobs by state, per-project coalescing counters and last-round figures."""

    def __init__(self, state: Any) -> None:
        self.state = state  # isal_backend.server.app.AppState

    def collect(self) -> Iterator[Metric]:
        journal = getattr(getattr(self.state, "submitter", None), "journal", None)
        if journal is not None:
            journaled = GaugeMetricFamily("isal_journaled_events", "Webhook events kept on disk while Redis was "
                                          "unavailable, not yet queued")
            try:
                journaled.add_metric([], journal.pending() if journal.has_pending() else 0)
            except OSError:
                journaled.add_metric([], -1)
            yield journaled
        up = GaugeMetricFamily("isal_queue_up", "1 when the queue's state could be read")
        try:
            snap = self.state.coalescer.snapshot()
            statuses = all_status(self.state.settings)
        except Exception:  # noqa: BLE001 - a scrape must answer even when Redis is down
            logger.warning("metrics: cannot read the queue state", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        depth = GaugeMetricFamily("isal_queue_depth", "Jobs waiting in the queue", labels=["queue"])
        depth.add_metric([snap["queue"]], snap["queue_depth"])
        yield depth
        jobs = GaugeMetricFamily("isal_jobs", "Jobs by state (RQ registries, or the embedded worker)", labels=["state"])
        for state, n in sorted(snap["jobs"].items()):
            jobs.add_metric([state], n)
        yield jobs

        pk = ["project", "kind"]
        running = GaugeMetricFamily("isal_project_running", "1 while a job of the project runs", labels=["project"])
        waiting = GaugeMetricFamily("isal_project_waiting", "1 while a job of the kind waits", labels=pk)
        events = CounterMetricFamily("isal_project_events", "Events received", labels=pk)
        absorbed = CounterMetricFamily("isal_project_absorbed", "Events absorbed by a waiting job", labels=pk)
        ends = CounterMetricFamily("isal_project_job_ends", "Job ends by outcome", labels=[*pk, "outcome"])
        lost = CounterMetricFamily("isal_project_lost_jobs", "Jobs whose worker died", labels=["project", "where"])
        for pid, fields in sorted(snap["projects"].items()):
            p = str(pid)
            running.add_metric([p], 1 if fields.get("run_id") else 0)
            for kind in ("round", "score"):
                waiting.add_metric([p, kind], 1 if fields.get(f"pend_{kind}") else 0)
                events.add_metric([p, kind], float(fields.get(f"events_{kind}", 0)))
                absorbed.add_metric([p, kind], float(fields.get(f"absorbed_{kind}", 0)))
            for name, value in fields.items():
                m = _OUTCOME_FIELD.fullmatch(name)
                if m:
                    ends.add_metric([p, m.group(2), m.group(1)], float(value))
            for where in ("running", "waiting"):
                lost.add_metric([p, where], float(fields.get(f"lost_{where}", 0)))
        yield from (running, waiting, events, absorbed, ends, lost)

        seconds = GaugeMetricFamily("isal_last_round_seconds", "Last round's timings", labels=["project", "phase"])
        scored = GaugeMetricFamily("isal_last_round_tasks_scored", "Tasks scored by the last round", labels=["project"])
        finished = GaugeMetricFamily("isal_last_round_finished_timestamp_seconds", "When the last round ended",
                                     labels=["project"])
        failed = GaugeMetricFamily("isal_last_job_failed", "1 when the project's last job failed or was lost",
                                   labels=["project"])
        failure_at = GaugeMetricFamily("isal_last_failure_timestamp_seconds", "When a job last failed for good",
                                       labels=["project", "kind"])
        for pid, st in sorted(statuses.items()):
            p = str(pid)
            report = st.get("last_round") or {}
            timings = report.get("timings") or {}
            for phase, value in list(timings.items())[:20] if isinstance(timings, dict) else []:
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    seconds.add_metric([p, _phase(phase)], float(value))
            if isinstance(report.get("seconds"), (int, float)):
                seconds.add_metric([p, "total"], float(report["seconds"]))
            if isinstance(report.get("tasks_scored"), int):
                scored.add_metric([p], report["tasks_scored"])
            if isinstance(report.get("finished_at"), (int, float)):
                finished.add_metric([p], float(report["finished_at"]))
            last_job = st.get("last_job") or {}
            if last_job:
                failed.add_metric([p], 1 if last_job.get("outcome") in (Outcome.FAILED, Outcome.LOST) else 0)
            failure = st.get("last_failure") or {}
            if isinstance(failure.get("at"), (int, float)):
                failure_at.add_metric([p, str(failure.get("kind", "round"))[:16]], float(failure["at"]))
        yield from (seconds, scored, finished, failed, failure_at)


class WebhookMetrics:
    """The webhook's own request figures (this process only)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "isal_webhook_seconds", "Time to validate and enqueue a webhook", registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.events = Counter("isal_webhook_requests", "Webhooks by action and result", ["action", "result"],
                              registry=registry)


def build_registry(state: Any) -> tuple[CollectorRegistry, WebhookMetrics]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(state))
    return registry, WebhookMetrics(registry)
