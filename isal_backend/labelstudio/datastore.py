"""A Label Studio project as the round's datastore (:class:`isal_backend.datastore.Datastore`).

With a :class:`~isal_backend.labelstudio.mirror.TaskMirror` a round reads from Label Studio only what changed
since the last one (see :func:`~isal_backend.labelstudio.mirror.sync`); without one, everything every time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from isal_backend.labelstudio.client import CleanUpReport, LabelStudioClient
from isal_backend.labelstudio.failures import FailedDownloads
from isal_backend.labelstudio.mirror import TaskMirror, normalize, sync


def previous_version(versions: Iterable[str], current: str) -> str | None:
    """The newest version before ``current`` of the same kind (round ids sort by time: ``isal-<UTC time>-...``)."""
    prefix = current.split("-", 1)[0] + "-" if "-" in current else current
    older = [v for v in versions if v != current and v.startswith(prefix) and v < current]
    return max(older, default=None)


def annotation_count(project: Mapping[str, Any]) -> int | None:
    """The project's annotations, cancelled ones included, as Label Studio counts them (None: not given)."""
    done, skipped = project.get("total_annotations_number"), project.get("skipped_annotations_number")
    if not isinstance(done, int) or not isinstance(skipped, int):
        return None
    return done + skipped


class LabelStudioDatastore:
    """One project of one Label Studio, through :class:`LabelStudioClient` (no torch here)."""

    def __init__(self, client: LabelStudioClient, project_id: int, mirror: TaskMirror | None = None,
                 resync_seconds: float = 3600.0, failures: FailedDownloads | None = None,
                 make_room: bool = False, before_call: Callable[[], Any] | None = None) -> None:
        """``failures``: images that failed lately are not downloaded again (see FailedDownloads).
        ``make_room``: before a write, delete every version but the served one (see :meth:`make_room`).
        ``before_call``: called before each of :meth:`clean_up`'s calls (the worker paces them, see
        :mod:`isal_backend.pacing`; :meth:`make_room` runs inside the round's paced write step)."""
        self.client = client
        self.project_id = int(project_id)
        self.mirror = mirror
        self.failures = failures
        self.resync_seconds = resync_seconds
        self._project: dict[str, Any] | None = None
        self._fetch_report: dict[str, Any] = {}
        self.last_clean_up: CleanUpReport | None = None
        self.makes_room = make_room
        self.before_call = before_call
        #: What the last :meth:`make_room` deleted (None: nothing was in the way).
        self.room_made: CleanUpReport | None = None

    def __repr__(self) -> str:
        return f"LabelStudioDatastore({self.client!r}, project={self.project_id})"

    def project(self) -> dict[str, Any]:
        """The project as Label Studio returns it, read once per datastore (a datastore serves one round)."""
        if self._project is None:
            self._project = self.client.get_project(self.project_id)
        return self._project

    def label_config(self) -> str:
        return str(self.project()["label_config"])

    def tasks(self) -> list[dict[str, Any]]:
        if self.mirror is None:
            self._fetch_report = {"mode": "full", "reason": "no mirror"}
            return self.client.list_tasks(self.project_id)
        project = self.project()
        number = project.get("task_number")
        self._fetch_report = sync(self.client, self.mirror, self.project_id,
                                  int(number) if isinstance(number, int) else None, self.resync_seconds,
                                  annotation_count(project))
        return self.mirror.tasks()

    def fetch_report(self) -> dict[str, Any]:
        return dict(self._fetch_report)

    def tasks_by_id(self, task_ids: Iterable[int]) -> list[dict[str, Any]]:
        ids = sorted({int(t) for t in task_ids})
        return [normalize(t) for t in self.client.tasks_with_annotations(self.project_id, ids)]

    def image(self, reference: str) -> bytes:
        return self.client.download(reference, failures=self.failures)

    def write(self, model_version: str, predictions: Sequence[Mapping[str, Any]]) -> int:
        if not predictions:
            return 0
        created = self.client.import_predictions(self.project_id, predictions)
        self.client.set_ordering(self.project_id, model_version)
        return created

    def add(self, predictions: Sequence[Mapping[str, Any]]) -> int:
        return self.client.import_predictions(self.project_id, predictions) if predictions else 0

    def make_room(self, model_version: str) -> int:
        """Before ``model_version`` is written: delete every version but the one served now (the newest older
        round), so that Label Studio never holds more than two rounds' predictions, not even for the
        moment between a write and its clean-up. Only a round whose predecessor's clean-up was cut short (a
        newer round waited) finds anything to delete; then it is usually one call of at most about 100
        predictions. What was done is :attr:`room_made` (None: nothing was
        in the way, or the datastore was made without ``make_room``).
        """
        if not self.makes_room:
            return 0
        versions = self.client.model_versions(self.project_id)
        served = previous_version(versions, model_version)
        if served is None or set(versions) <= {served, model_version}:
            return 0
        self.room_made = self.client.delete_old_predictions(self.project_id, served, spare=[model_version],
                                                            versions=versions)
        return self.room_made.deleted

    def clean_up(self, keep: str, stop: Callable[[], bool] | None = None) -> int:
        """Delete older rounds' predictions in bounded calls, keeping ``keep``'s.

        The version before ``keep`` goes last and only while ``stop`` says no (a newer round waits: it
        deletes it then); every older one goes regardless, so at most two rounds' predictions stay.
        The report of what was done is :attr:`last_clean_up`.
        """
        if self.before_call is not None:
            self.before_call()
        versions = self.client.model_versions(self.project_id)  # read once: the calls below are given it
        previous = previous_version(versions, keep)
        report = self.client.delete_old_predictions(self.project_id, keep, spare=[previous] if previous else [],
                                                    versions=versions, before_call=self.before_call)
        if previous is not None:  # every other version is gone now
            left = {v: n for v, n in versions.items() if v in (keep, previous)}
            later = self.client.delete_old_predictions(self.project_id, keep, stop=stop, versions=left,
                                                       before_call=self.before_call)
            report = CleanUpReport(report.deleted + later.deleted, report.calls + later.calls,
                                   round(report.seconds + later.seconds, 4),
                                   max(report.longest_call_seconds, later.longest_call_seconds), later.stopped)
        self.last_clean_up = report
        return report.deleted
