"""Label Studio's stamps read as times, not strings: it sends one whose microseconds are 0 without a fraction
(``...:05Z``), which as a string sorts after a later stamp of the same second (``...:05.3Z``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from isal_backend.labelstudio.mirror import TaskMirror, sync
from isal_backend.round import newest_annotation

WHOLE = "2026-01-01T10:00:05Z"  # as LS (Django REST framework) writes a stamp at .000000
LATER = "2026-01-01T10:00:05.300000Z"  # later, though it sorts first as a string


class Source:
    """Label Studio's answers as the mirror asks them, with whole-second stamps."""

    def __init__(self) -> None:
        self.since: list[str] = []
        self.newest = "2026-01-01T10:00:04.900000Z"
        self.changed = [{"id": 1, "data": {}, "updated_at": WHOLE, "total_annotations": 0},
                        {"id": 2, "data": {}, "updated_at": LATER, "total_annotations": 0}]

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
        return [{"id": 1, "data": {}, "annotations": []}]

    def newest_task_update(self, project_id: int) -> str | None:
        return self.newest

    def tasks_updated_since(self, project_id: int, since: str) -> list[dict[str, Any]]:
        self.since.append(since)
        return self.changed

    def tasks_with_annotations(self, project_id: int, task_ids: Any) -> list[dict[str, Any]]:
        return []

    def task_ids(self, project_id: int) -> list[int]:
        return [1]


def test_a_whole_second_cursor_syncs(tmp_path: Path) -> None:
    source, mirror = Source(), TaskMirror(tmp_path / "mirror.sqlite3")
    assert sync(source, mirror, 1, None, 3600)["mode"] == "full"
    assert sync(source, mirror, 1, None, 3600)["mode"] == "incremental"
    assert mirror.meta("cursor") == LATER
    source.newest = WHOLE
    assert sync(source, mirror, 1, None, 0)["mode"] == "full" and mirror.meta("cursor") == WHOLE
    source.changed = []
    assert sync(source, mirror, 1, None, 3600)["mode"] == "incremental"  # a whole-second cursor is read back
    assert source.since == ["2026-01-01T09:59:59.900000Z", "2026-01-01T10:00:00.000000Z"]


def test_the_newest_annotation_is_the_latest_time() -> None:
    tasks = [{"id": 1, "annotations": [{"updated_at": LATER}, {"updated_at": WHOLE}]}]
    assert newest_annotation(tasks) == LATER
