"""Reconciliation: a round for annotations whose webhook never arrived.

Label Studio sends each webhook once with a 1 s timeout and never retries, so an event can be lost (the
backend was down or restarting, a network blip, a 401 before the webhook had its basic auth). Each
period, for every project set up under ``MODEL_DIR/projects/`` that has Label Studio credentials and no
round running or waiting, :class:`Reconciler` asks Label Studio when an annotation last changed (one
cheap request: :meth:`~isal_backend.labelstudio.client.LabelStudioClient.newest_annotation_update`) and
compares it with the current round's report (``fetched_at``, the moment the round read Label Studio, or
``finished_at`` for rounds that do not record it). Newer annotations start a round; each annotation time
starts at most one (a round that fails on them is not restarted every period): what was acted on is
remembered in memory (embedded) or in Redis (RQ, so that every worker knows).

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


def last_round_time(model_dir: str | Path, project_id: int) -> datetime | None:
    """When the project's current round read Label Studio (None: no round yet)."""
    from isal_backend.store import ModelStore  # torch: only where rounds run anyway

    state = ModelStore(model_dir).load(project_id)
    if state is None:
        return None
    return parse_time(state.report.get("fetched_at") or state.report.get("finished_at"))


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

        started: list[dict[str, Any]] = []
        for project_id in known_projects(self.settings.model_dir):
            try:
                credentials = project_credentials(self.settings, project_id)
            except SettingsError:
                continue  # not (yet) verified: nothing can be asked
            try:
                if self.busy(project_id):
                    continue  # a round runs or waits: it reads Label Studio's latest state
                last = last_round_time(self.settings.model_dir, project_id)
                with LabelStudioClient(credentials.url, credentials.api_key, timeout=15, retries=0) as client:
                    newest = parse_time(client.newest_annotation_update(project_id))
            except (LabelStudioError, OSError, ValueError, KeyError) as exc:
                logger.warning("reconcile: project %s skipped: %s", project_id, exc)
                continue
            if newest is None or (last is not None and newest <= last):
                continue
            acted = parse_time(self.memory.get(project_id))
            if acted is not None and newest <= acted:
                continue
            self.submit(project_id)
            self.memory[project_id] = newest.isoformat()
            logger.warning("reconcile: project %s has annotations changed at %s, after its last round (%s): "
                           "starting a round (a webhook was missed)", project_id, newest.isoformat(),
                           last.isoformat() if last else "none")
            started.append({"project": project_id, "newest_annotation": newest.isoformat(),
                            "last_round": last.isoformat() if last else None})
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
