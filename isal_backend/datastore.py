"""The datastore port: where a round reads a project's tasks and images and writes its order.

The round (:mod:`isal_backend.round`) talks to this protocol only. Two implementations:
:class:`isal_backend.labelstudio.datastore.LabelStudioDatastore` (the product: a Label Studio project
through its API) and :class:`isal_backend.bench.offline.OfflineDatastore` (a benchmark's images and
labels, with a simulated annotator), so the benchmark runs the backend's own round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol


class Datastore(Protocol):
    """One project's tasks (Label Studio's JSON shapes), images, and labeling stream."""

    project_id: int

    def label_config(self) -> str:
        """The project's label config (XML)."""
        ...

    def tasks(self) -> list[dict[str, Any]]:
        """Every task as ``{"id", "data", "annotations": [...]}``, cancelled annotations included, by id."""
        ...

    def fetch_report(self) -> dict[str, Any]:
        """What the last :meth:`tasks` read (full or incremental, how many tasks), for the round's report."""
        ...

    def tasks_by_id(self, task_ids: Iterable[int]) -> list[dict[str, Any]]:
        """The given tasks, same shape (for scoring new tasks)."""
        ...

    def image(self, reference: str) -> bytes:
        """The bytes behind a task's image reference."""
        ...

    def make_room(self, model_version: str) -> int:
        """Before ``model_version`` is written, delete what would leave more than two rounds' predictions
        (every version but the one served now); returns how many were deleted. The round calls it just
        before :meth:`write`."""
        ...

    def write(self, model_version: str, predictions: Sequence[Mapping[str, Any]]) -> int:
        """Create ``predictions`` (``{"task", "model_version", "score", "result"}``) and serve them.

        Serving means the labeling stream now hands out ``model_version``'s tasks by ascending score;
        returns how many were created.
        """
        ...

    def add(self, predictions: Sequence[Mapping[str, Any]]) -> int:
        """Create predictions of the version already served (new tasks join the stream)."""
        ...

    def clean_up(self, keep: str) -> int:
        """Delete older rounds' predictions, keeping ``keep``'s; returns how many were deleted."""
        ...
