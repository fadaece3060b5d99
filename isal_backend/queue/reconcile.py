"""Reconciliation: a round for annotations whose webhook never arrived.

Label Studio sends each webhook once with a 1 s timeout and never retries, so an event can be lost (the
backend was down or restarting, a network blip, a 401 before the webhook had its basic auth). Each
period, for every project set up under ``MODEL_DIR/projects/`` that has Label Studio credentials and no
round running or waiting, :class:`Reconciler` asks Label Studio when an annotation last changed (one
cheap request: :meth:`~isal_backend.labelstudio.client.LabelStudioClient.newest_annotation_update`) and
compares it with the current round's report (``fetched_at``, the moment the round read Label Studio, or
``finished_at`` for rounds that do not record it). Newer annotations start a round. So does a project
whose annotations (counted by Label Studio, cancelled ones included) outnumber those the last round
mirrored: an annotation saved while that round read Label Studio can carry a time before the read and
still be missing from it (seen on 1.23.2 under an annotator labeling about once a second), and no event
follows it when it was the last. Each annotation time, and each count, starts at most one round (a
round that fails on them is not restarted every period): what was acted on is remembered in memory
(embedded) or in Redis (RQ, so that every worker knows).

It runs in the RQ worker's sweeper (one worker per period, under a Redis lock) and in the embedded
queue's own thread. Not caught: the deletion of a task's last annotation (the task then drops out of the
query); the next annotation, or an ANNOTATIONS_DELETED webhook that did arrive, brings it in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any

from isal_backend.settings import Settings, SettingsError, project_credentials
from isal_backend.times import parse_time

logger = logging.getLogger(__name__)


def known_projects(model_dir: str | Path) -> list[int]:
    """Projects that were set up here (a folder ``MODEL_DIR/projects/<id>``)."""
    folder = Path(model_dir) / "projects"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())


def last_round(model_dir: str | Path, project_id: int) -> tuple[datetime | None, int | None]:
    """When the project's current round read Label Studio and how many annotations it then mirrored
    (None, None: no round yet; the count is None for rounds that read without a mirror)."""
    from isal_backend.store import ModelStore  # torch: only where rounds run anyway

    state = ModelStore(model_dir).load(project_id)
    if state is None:
        return None, None
    fetch = state.report.get("fetch")
    count = fetch.get("annotations") if isinstance(fetch, dict) else None
    return (parse_time(state.report.get("fetched_at") or state.report.get("finished_at")),
            count if isinstance(count, int) else None)


def _acted(value: str | None) -> tuple[datetime | None, int | None]:
    """What memory says a round was started for: ``<annotation time>|<annotation count>`` (either may be empty)."""
    when, _, count = (value or "").partition("|")
    return parse_time(when) if when else None, int(count) if count.isdigit() else None


class Reconciler:
    """Starts a round for each project whose annotations are newer than its last round (see the module doc)."""

    def __init__(self, settings: Settings, submit: Callable[[int], Any], busy: Callable[[int], bool],
                 memory: MutableMapping[int, str] | None = None) -> None:
        """``memory``: project -> the newest annotation time (ISO) a round was started for; a dict by default."""
        self.settings = settings
        self.submit, self.busy = submit, busy
        self.memory: MutableMapping[int, str] = memory if memory is not None else {}

    def run_once(self) -> list[dict[str, Any]]:
        """Check every known project once; return the rounds it started."""
        from isal_backend.labelstudio.client import LabelStudioClient, LabelStudioError
        from isal_backend.labelstudio.datastore import annotation_count

        started: list[dict[str, Any]] = []
        for project_id in known_projects(self.settings.model_dir):
            try:
                credentials = project_credentials(self.settings, project_id)
            except SettingsError:
                continue  # not (yet) verified: nothing can be asked
            try:
                if self.busy(project_id):
                    continue  # a round runs or waits: it reads Label Studio's latest state
                last, mirrored = last_round(self.settings.model_dir, project_id)
                with LabelStudioClient(credentials.url, credentials.api_key, timeout=15, retries=0) as client:
                    newest = parse_time(client.newest_annotation_update(project_id))
                    count = annotation_count(client.get_project(project_id)) if mirrored is not None else None
            except (LabelStudioError, OSError, ValueError, KeyError) as exc:
                logger.warning("reconcile: project %s skipped: %s", project_id, exc)
                continue
            acted_time, acted_count = _acted(self.memory.get(project_id))
            by_time = newest is not None and (last is None or newest > last) and (
                acted_time is None or newest > acted_time)
            by_count = count is not None and mirrored is not None and count > mirrored and (
                acted_count is None or count > acted_count)
            if not (by_time or by_count):
                continue
            self.submit(project_id)
            remembered = newest if by_time else acted_time
            self.memory[project_id] = (f"{remembered.isoformat() if remembered else ''}|"
                                       f"{count if by_count else acted_count if acted_count is not None else ''}")
            if by_time:
                logger.warning("reconcile: project %s has annotations changed at %s, after its last round (%s): "
                               "starting a round (a webhook was missed)", project_id, newest.isoformat(),
                               last.isoformat() if last else "none")
            else:
                logger.warning("reconcile: project %s has %s annotations in Label Studio, its last round mirrored "
                               "%s: starting a round", project_id, count, mirrored)
            started.append({"project": project_id, "newest_annotation": newest.isoformat() if newest else None,
                            "last_round": last.isoformat() if last else None, "annotations": count,
                            "mirrored": mirrored, "why": "time" if by_time else "count"})
        return started


class RedisMemory(MutableMapping[int, str]):
    """The reconciler's memory in a Redis hash, shared by every worker of the queue."""

    def __init__(self, redis: Any, key: str) -> None:
        self.redis, self.key = redis, key

    def __getitem__(self, project_id: int) -> str:
        value = self.redis.hget(self.key, int(project_id))
        if value is None:
            raise KeyError(project_id)
        return value.decode() if isinstance(value, bytes) else str(value)

    def __setitem__(self, project_id: int, value: str) -> None:
        self.redis.hset(self.key, int(project_id), value)

    def __delitem__(self, project_id: int) -> None:
        self.redis.hdel(self.key, int(project_id))

    def __iter__(self) -> Iterator[int]:
        return (int(k) for k in self.redis.hkeys(self.key))

    def __len__(self) -> int:
        return int(self.redis.hlen(self.key))
