"""A project's round history: one JSON line per committed round, kept for as long as the project lives.

The model store keeps only the newest rounds' folders (:meth:`isal_backend.store.ModelStore.prune`), so the
learning curve and the timeline of the dashboard read this append-only file instead:
``MODEL_DIR/projects/<id>/history.jsonl``. Each line is :func:`summary` of a round's report (counts,
order, validation figure, timings, freshness inputs), a few hundred bytes.

Appends are safe across processes and hosts on one filesystem: each line is one ``write`` on an
``O_APPEND`` descriptor under an exclusive ``flock``, and a line torn by a killed writer is closed
before the next one is written (readers skip what does not parse). No torch here: the web process
reads this module.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from isal_backend.times import parse_time

HISTORY_FILE = "history.jsonl"
#: Report fields a history line keeps (the bulky lists are counted instead).
SUMMARY_FIELDS = (
    "round_id", "model_version", "kind", "strategy", "order", "cold_start_reason", "labeled", "unlabeled",
    "written", "write_size", "validation_accuracy", "validation_map50", "reference_size", "fetched_at",
    "newest_annotation_at", "finished_at", "seconds",
)
#: The round's steps, in the order the round runs them (the keys of a report's ``timings``, ``_seconds`` cut).
STEPS = ("fetch", "features", "fit", "s_test", "score", "write_back")
#: The validation figure of each task kind: report field, and what it is.
METRICS = {
    "classification": ("validation_accuracy", "cross-validated accuracy"),
    "detection": ("validation_map50", "held-out mAP@0.5"),
}


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The history line of a round's report: the fields the curve and timeline need, lists as counts."""
    out = {k: report[k] for k in SUMMARY_FIELDS if report.get(k) is not None}
    if isinstance(out.get("cold_start_reason"), str):
        out["cold_start_reason"] = out["cold_start_reason"][:300]
    timings = report.get("timings")
    if isinstance(timings, Mapping):
        out["timings"] = {k: v for k, v in timings.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for name in ("skipped", "notes"):
        if isinstance(report.get(name), list):
            out[name] = len(report[name])
    return out


def history_path(project_dir: str | Path) -> Path:
    return Path(project_dir) / HISTORY_FILE


def append(project_dir: str | Path, entry: Mapping[str, Any],
           seed: Iterable[Mapping[str, Any]] | None = None) -> None:
    """Append ``entry`` as one line; ``seed``: lines written first when the file does not exist yet
    (the rounds a project committed before it had a history)."""
    path = history_path(project_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        lines = [json.dumps(dict(e), default=str, separators=(",", ":")) for e in (seed or []) if size == 0]
        lines.append(json.dumps(dict(entry), default=str, separators=(",", ":")))
        text = "\n".join(lines) + "\n"
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a writer was killed mid-line: close its line
            text = "\n" + text
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def _parse(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.splitlines():
        try:
            value = json.loads(line)
        except ValueError:  # a line torn by a killed writer
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


@dataclass
class _Cached:
    inode: int
    offset: int  # bytes parsed so far (always at a line end)
    entries: list[dict[str, Any]] = field(default_factory=list)


class HistoryReader:
    """Reads history files, parsing only what was appended since the last read (a page view is cheap)."""

    def __init__(self) -> None:
        self._cache: dict[Path, _Cached] = {}
        self._lock = threading.Lock()

    def read(self, project_dir: str | Path) -> list[dict[str, Any]]:
        """Every round of the project, oldest first; without a history file, its stored rounds' reports."""
        path = history_path(project_dir)
        try:
            with open(path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                with self._lock:
                    cached = self._cache.get(path)
                    if cached is None or cached.inode != stat.st_ino or stat.st_size < cached.offset:
                        cached = _Cached(stat.st_ino, 0)
                    fh.seek(cached.offset)
                    data = fh.read(stat.st_size - cached.offset)
                    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
                    cached = _Cached(cached.inode, cached.offset + len(complete), cached.entries + _parse(complete))
                    self._cache[path] = cached
                    return list(cached.entries)
        except FileNotFoundError:
            return stored_rounds(project_dir)


def stored_rounds(project_dir: str | Path) -> list[dict[str, Any]]:
    """Summaries of the rounds still in the model store, oldest first (round ids sort by time)."""
    folder = Path(project_dir) / "rounds"
    out = []
    for report in sorted(folder.glob("[!.]*/report.json")) if folder.exists() else []:
        try:
            out.append(summary(json.loads(report.read_text())))
        except (OSError, ValueError):
            continue
    return out


def freshness(entries: list[Mapping[str, Any]]) -> list[float | None]:
    """Per round, seconds from the newest annotation it saw to its new order being served, where known.

    Known when that annotation arrived after the previous round read Label Studio (so this round is
    the first to serve an order that reflects it); a round that re-read an older state (a forced
    round, a retry) measures no freshness.
    """
    out: list[float | None] = []
    previous_fetch: datetime | None = None
    for i, entry in enumerate(entries):
        newest, finished = parse_time(entry.get("newest_annotation_at")), parse_time(entry.get("finished_at"))
        value = None
        if i > 0 and newest is not None and finished is not None and previous_fetch is not None \
                and newest > previous_fetch:
            value = round((finished - newest).total_seconds(), 3)
        out.append(value)
        previous_fetch = parse_time(entry.get("fetched_at")) or previous_fetch
    return out
