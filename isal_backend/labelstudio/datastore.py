"""A Label Studio project as the round's datastore (:class:`isal_backend.datastore.Datastore`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from isal_backend.labelstudio.client import LabelStudioClient


class LabelStudioDatastore:
    """One project of one Label Studio, through :class:`LabelStudioClient` (no torch here)."""

    def __init__(self, client: LabelStudioClient, project_id: int) -> None:
        self.client = client
        self.project_id = int(project_id)
        self._label_config: str | None = None

    def __repr__(self) -> str:
        return f"LabelStudioDatastore({self.client!r}, project={self.project_id})"

    def label_config(self) -> str:
        if self._label_config is None:
            self._label_config = str(self.client.get_project(self.project_id)["label_config"])
        return self._label_config

    def tasks(self) -> list[dict[str, Any]]:
        return self.client.list_tasks(self.project_id)

    def tasks_by_id(self, task_ids: Iterable[int]) -> list[dict[str, Any]]:
        wanted = {int(t) for t in task_ids}
        return [t for t in self.client.list_tasks(self.project_id) if t["id"] in wanted]

    def image(self, reference: str) -> bytes:
        return self.client.download(reference)

    def write(self, model_version: str, predictions: Sequence[Mapping[str, Any]]) -> int:
        if not predictions:
            return 0
        created = self.client.import_predictions(self.project_id, predictions)
        self.client.set_ordering(self.project_id, model_version)
        return created

    def add(self, predictions: Sequence[Mapping[str, Any]]) -> int:
        return self.client.import_predictions(self.project_id, predictions) if predictions else 0

    def clean_up(self, keep: str) -> int:
        return self.client.delete_predictions(self.project_id, keep)
