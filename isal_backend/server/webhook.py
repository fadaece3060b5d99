"""Validation of Label Studio webhook bodies (shapes taken from real Label Studio 1.23.2 requests).

label-studio-ml 1.0.9 pops ``action`` from whatever arrives and hands it to a job; a malformed body
becomes a 500 or a crashed job. Here every body is checked before anything is enqueued, and the answer
to a bad one is a 400 that says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# TASKS_DELETED too: deleted tasks may have carried labels, and the stream's order must drop them.
RETRAIN_ACTIONS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "ANNOTATIONS_CREATED", "START_TRAINING",
     "TASKS_DELETED"}
)
SCORE_ACTIONS = frozenset({"TASKS_CREATED"})
#: An annotator's own acts in the labeling UI, each followed at once by the UI asking for the next task:
#: the rounds pace their calls to Label Studio around them (isal_backend.pacing).
ANNOTATOR_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"})
# Sent by Label Studio with send_for_all_actions: acknowledged, no job. PROJECT_UPDATED in particular is
# sent for the backend's own project PATCHes: retraining on it would loop.
IGNORED_ACTIONS = frozenset(
    {
        "PROJECT_UPDATED", "PROJECT_CREATED", "PROJECT_DELETED",
        "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED",
        "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED",
    }
)
KNOWN_ACTIONS = RETRAIN_ACTIONS | SCORE_ACTIONS | IGNORED_ACTIONS
#: Largest id accepted (Label Studio's ids are database integers): a 4,000-digit "id" would become a Redis key
#: and a file name ("file name too long").
MAX_ID = 2**63 - 1


class WebhookError(ValueError):
    """The body is not a webhook this backend understands; the message says why (sent back as a 400)."""


@dataclass(frozen=True)
class WebhookEvent:
    """A validated event: what to enqueue for which project."""

    action: str
    project_id: int
    retrain: bool
    score_task_ids: tuple[int, ...] = ()


def shown(value: Any, limit: int = 40) -> str:
    """A bad value as an error message quotes it: scalars cut to ``limit`` characters, containers by type."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = repr(value)
        if isinstance(value, int) and not isinstance(value, bool) and len(text) > limit:
            return f"an integer of {len(text.lstrip('-'))} digits"
        return text[:limit] + ("..." if len(text) > limit else "")
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(body: dict[str, Any], name: str, action: str) -> dict[str, Any]:
    value = body.get(name)
    if not isinstance(value, dict):
        raise WebhookError(f"{action}: field '{name}' must be a JSON object, got {type(value).__name__}")
    return value


def _object_id(obj: dict[str, Any], where: str) -> int:
    value = obj.get("id")
    if not _is_int(value) or not 0 < value <= MAX_ID:
        raise WebhookError(f"{where}: 'id' must be a positive integer below 2**63, got {shown(value)}")
    return value


def _id_list(body: dict[str, Any], name: str, action: str) -> list[int]:
    value = body.get(name)
    if not isinstance(value, list) or not value:
        raise WebhookError(f"{action}: field '{name}' must be a non-empty list of objects with an integer 'id'")
    ids = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise WebhookError(f"{action}: {name}[{i}] must be a JSON object, got {type(item).__name__}")
        ids.append(_object_id(item, f"{action}: {name}[{i}]"))
    return ids


def parse_webhook(body: Any) -> WebhookEvent:
    """Check a webhook body; raise :class:`WebhookError` with a message for anything malformed or unknown."""
    if not isinstance(body, dict):
        raise WebhookError("the body must be a JSON object with an 'action' field")
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise WebhookError("field 'action' must be a non-empty string")
    if action not in KNOWN_ACTIONS:
        raise WebhookError(f"unknown action {action[:64]!r}: expected one of {', '.join(sorted(KNOWN_ACTIONS))}")
    project_id = _object_id(_object(body, "project", action), f"{action}: project")

    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        annotation = _object(body, "annotation", action)
        _object_id(annotation, f"{action}: annotation")
        task = _object(body, "task", action)
        task_id = _object_id(task, f"{action}: task")
        for obj, name in ((annotation, "annotation"), (task, "task")):
            if "project" in obj and obj["project"] != project_id:
                raise WebhookError(f"{action}: {name}.project={obj['project']!r} differs from project.id={project_id}")
        if annotation.get("task", task_id) != task_id:
            raise WebhookError(f"{action}: annotation.task={annotation['task']!r} differs from task.id={task_id}")
    elif action in ("ANNOTATIONS_DELETED", "ANNOTATIONS_CREATED"):
        _id_list(body, "annotations", action)
    elif action == "TASKS_CREATED":
        task_ids = _id_list(body, "tasks", action)
        # Tasks imported together with annotations produce only TASKS_CREATED: those labels need a round.
        labeled = any(
            (_is_int(t.get("total_annotations")) and t["total_annotations"] > 0) or bool(t.get("annotations"))
            for t in body["tasks"]
        )
        return WebhookEvent(action, project_id, retrain=labeled, score_task_ids=tuple(task_ids))

    return WebhookEvent(action, project_id, retrain=action in RETRAIN_ACTIONS)
