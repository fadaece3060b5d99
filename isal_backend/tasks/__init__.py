"""The task kinds: one :class:`~isal_backend.tasks.base.Task` class per labeling control tag.

:func:`task_for` builds the project's task from its parsed label config; :data:`TASK_KINDS` is the one
list of kinds (a new kind is one module and one entry here).
"""

from __future__ import annotations

from isal_backend.labelstudio.config import LabelConfig
from isal_backend.tasks.base import Task, TaskParts
from isal_backend.tasks.classification import ClassificationTask
from isal_backend.tasks.detection import DetectionTask

TASK_KINDS: dict[str, type[Task]] = {ClassificationTask.kind: ClassificationTask, DetectionTask.kind: DetectionTask}


def task_for(config: LabelConfig, parts: TaskParts) -> Task:
    """The task kind of ``config`` (a :class:`~isal_backend.labelstudio.config.LabelConfig` subclass)."""
    try:
        kind = TASK_KINDS[config.kind]
    except KeyError:
        raise ValueError(f"no task kind for {config.kind!r} label configs: known {sorted(TASK_KINDS)}") from None
    return kind(config, parts)


__all__ = ["TASK_KINDS", "Task", "TaskParts", "task_for"]
