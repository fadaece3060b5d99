"""An offline datastore: a benchmark's images and labels held as a Label Studio project would hold them.

The benchmark runs the backend's own round (:class:`isal_backend.round.Round`) on this datastore, so
its figures describe the product. It keeps tasks in Label Studio's JSON shapes, stores the round's
predictions by model version, and serves the labeling stream the way Label Studio 1.23.2's
"Uncertainty sampling" does: tasks with a prediction of the served version by ascending score, then
the rest at random. A simulated annotator labels what the stream serves with the ground truth, or
skips it (a cancelled annotation), as a person would skip an image that is none of the classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class OfflineDatastore:
    """One benchmark project: tasks, annotations, predictions and the stream, in memory."""

    def __init__(self, project_id: int, label_config: str, references: Mapping[int, str],
                 images: Callable[[str], bytes], image_key: str = "image", seed: int = 0) -> None:
        self.project_id = int(project_id)
        self._label_config = label_config
        self._images = images
        self._tasks = {int(i): {"id": int(i), "data": {image_key: ref}, "annotations": []}
                       for i, ref in sorted(references.items())}
        self._predictions: dict[str, dict[int, dict[str, Any]]] = {}
        self.served: str | None = None
        self._rng = np.random.default_rng(seed)
        self._clock = 0  # annotation timestamps: one second apart, so "latest" is well defined
        self._annotation_id = 0
        self.writes: list[int] = []  # predictions written per round (the benchmark reports them)

    # -- the Datastore port ---------------------------------------------------------------------------
    def label_config(self) -> str:
        return self._label_config

    def tasks(self) -> list[dict[str, Any]]:
        return [self._copy(t) for t in self._tasks.values()]

    def fetch_report(self) -> dict[str, Any]:
        return {"mode": "offline", "tasks": len(self._tasks)}

    def tasks_by_id(self, task_ids: Iterable[int]) -> list[dict[str, Any]]:
        return [self._copy(self._tasks[int(i)]) for i in task_ids if int(i) in self._tasks]

    def image(self, reference: str) -> bytes:
        return self._images(reference)

    def make_room(self, model_version: str) -> int:
        old = [v for v in self._predictions if v not in (self.served, model_version)]
        return sum(len(self._predictions.pop(v)) for v in old)

    def write(self, model_version: str, predictions: Sequence[Mapping[str, Any]]) -> int:
        if not predictions:
            return 0
        self._predictions[model_version] = {int(p["task"]): dict(p) for p in predictions}
        self.served = model_version
        self.writes.append(len(predictions))
        return len(predictions)

    def add(self, predictions: Sequence[Mapping[str, Any]]) -> int:
        for p in predictions:
            self._predictions.setdefault(str(p["model_version"]), {})[int(p["task"])] = dict(p)
        return len(predictions)

    def clean_up(self, keep: str) -> int:
        old = [v for v in self._predictions if v != keep]
        deleted = sum(len(self._predictions.pop(v)) for v in old)
        return deleted

    # -- the annotator's side -------------------------------------------------------------------------
    def stream(self, count: int) -> list[int]:
        """The next ``count`` tasks an annotator is served, in order (Uncertainty sampling's rule)."""
        open_tasks = [i for i, t in self._tasks.items() if not t["annotations"]]
        scored = self._predictions.get(self.served or "", {})
        ranked = sorted((i for i in open_tasks if i in scored), key=lambda i: (scored[i]["score"], i))
        rest = [i for i in open_tasks if i not in scored]
        if len(ranked) < count and rest:
            rest = [rest[j] for j in self._rng.permutation(len(rest))]
        return (ranked + rest)[:count]

    def prediction(self, task_id: int) -> dict[str, Any] | None:
        """The served version's prediction of a task (its pre-label), if it has one."""
        return self._predictions.get(self.served or "", {}).get(int(task_id))

    def annotate(self, task_id: int, result: list[dict[str, Any]] | None, skipped: bool = False) -> None:
        """Label a task with ``result``, or skip it (Label Studio stores ``was_cancelled: true``)."""
        self._clock += 1
        self._annotation_id += 1
        at = (_EPOCH + timedelta(seconds=self._clock)).isoformat().replace("+00:00", "Z")
        self._tasks[int(task_id)]["annotations"].append({
            "id": self._annotation_id, "task": int(task_id), "result": [] if skipped else list(result or []),
            "was_cancelled": bool(skipped), "created_at": at, "updated_at": at})

    @property
    def annotated(self) -> list[int]:
        return [i for i, t in self._tasks.items() if t["annotations"]]

    @staticmethod
    def _copy(task: dict[str, Any]) -> dict[str, Any]:
        return {"id": task["id"], "data": dict(task["data"]), "annotations": [dict(a) for a in task["annotations"]]}
