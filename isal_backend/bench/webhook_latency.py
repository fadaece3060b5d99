"""Webhook latency under concurrency: Label Studio sends webhooks synchronously with a 1 s timeout.

``measure_webhook_latency(url, n_events, concurrency)`` posts ``n_events`` ANNOTATION_CREATED bodies shaped
like Label Studio 1.23.2's (about 4 KB) with ``concurrency`` requests in flight, and returns client-side
latency percentiles. It uses only the standard library, so it runs wherever the backend runs.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
           '<Choice value="cat"/><Choice value="dog"/></Choices></View>')


def annotation_event(project_id: int, annotation_id: int, task_id: int) -> dict[str, Any]:
    """An ANNOTATION_CREATED body with the fields (and roughly the size) Label Studio sends."""
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": annotation_id, "task": task_id, "project": project_id, "completed_by": 1, "was_cancelled": False,
            "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["dog"]}}],
            "ground_truth": False, "lead_time": 1.5, "result_count": 1, "prediction": {},
        },
        "task": {"id": task_id, "project": project_id, "data": {"image": f"http://127.0.0.1:8000/img_{task_id}.png"},
                 "meta": {}, "is_labeled": True, "overlap": 1, "total_annotations": 1, "total_predictions": 1},
        "project": {"id": project_id, "title": f"P{project_id}", "label_config": _CONFIG, "description": "x" * 2000,
                    "sampling": "Uncertainty sampling", "model_version": "isal-backend"},
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def measure_webhook_latency(
    url: str,
    n_events: int,
    concurrency: int,
    *,
    projects: Sequence[int] = (1, 2, 3),
    auth: tuple[str, str] | None = None,
    timeout_s: float = 10.0,
) -> dict[str, float]:
    """POST ``n_events`` webhooks to ``url`` (the backend's /webhook) with ``concurrency`` in flight.

    Returns ``p50_ms``, ``p99_ms``, ``max_ms``, ``mean_ms``, ``errors`` (non-2xx or failed requests),
    ``n`` and ``wall_s``. Each thread keeps one connection open, as Label Studio's requests session does.
    """
    parts = urlsplit(url)
    path = parts.path or "/webhook"
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    bodies = [
        json.dumps(annotation_event(projects[i % len(projects)], 100000 + i, 5000 + i)).encode()
        for i in range(n_events)
    ]
    local = threading.local()
    start_gate = threading.Barrier(min(concurrency, n_events)) if n_events else None

    def connection() -> http.client.HTTPConnection:
        conn = getattr(local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = cls(parts.hostname, parts.port, timeout=timeout_s)
            local.conn = conn
            if start_gate is not None:
                with contextlib.suppress(threading.BrokenBarrierError):
                    start_gate.wait(timeout=timeout_s)
        return conn

    def post(body: bytes) -> tuple[float, bool]:
        conn = connection()
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            ok = 200 <= response.status < 300
        except (OSError, http.client.HTTPException):
            conn.close()
            local.conn = None
            ok = False
        return (time.perf_counter() - t0) * 1000, ok

    wall0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(post, bodies))
    wall = time.perf_counter() - wall0
    latencies = [ms for ms, _ in results]
    return {
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
        "mean_ms": round(sum(latencies) / len(latencies), 2) if latencies else float("nan"),
        "errors": sum(1 for _, ok in results if not ok),
        "n": len(results),
        "wall_s": round(wall, 3),
    }
