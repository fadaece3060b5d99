"""Convert between Label Studio annotations/predictions and plain labels, and map influence ranks to LS scores."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from isal_backend.labelstudio.config import ClassificationConfig
from isal_backend.times import parse_time

#: AnnotationSkipped's reason when the annotators skipped the task (every annotation cancelled).
CANCELLED = "all annotations of the task were cancelled"


class AnnotationSkipped(ValueError):
    """An annotation (or task) gives no usable training label; `reason` says why, for the caller to report."""

    def __init__(self, reason: str, annotation_id: Any = None, task_id: Any = None) -> None:
        self.reason = reason
        self.annotation_id = annotation_id
        self.task_id = task_id
        where = ", ".join(f"{k} {v}" for k, v in (("task", task_id), ("annotation", annotation_id)) if v is not None)
        super().__init__(f"{where}: {reason}" if where else reason)


def annotation_label(annotation: Mapping[str, Any], config: ClassificationConfig) -> str:
    """Return the single class label of `annotation`, or raise AnnotationSkipped with the reason."""
    ann_id, task_id = annotation.get("id"), annotation.get("task")
    if annotation.get("was_cancelled"):
        raise AnnotationSkipped("annotation was cancelled (skipped by the annotator)", ann_id, task_id)
    result = annotation.get("result") or []
    if not result:
        raise AnnotationSkipped("annotation result is empty", ann_id, task_id)
    ours = [r for r in result if isinstance(r, Mapping) and r.get("from_name") == config.choices_name]
    if not ours:
        names = sorted({str(r.get("from_name")) for r in result if isinstance(r, Mapping)})
        raise AnnotationSkipped(
            f"result has no item from <Choices name=\"{config.choices_name}\"> (found from_name {names})",
            ann_id, task_id)
    chosen: list[str] = []
    for item in ours:
        value = item.get("value")
        choices = value.get("choices") if isinstance(value, Mapping) else None
        if not isinstance(choices, list):
            raise AnnotationSkipped(f"result item has no list of choices: {item!r:.200}", ann_id, task_id)
        chosen.extend(str(c) for c in choices)
    if len(chosen) != 1:
        raise AnnotationSkipped(f"expected exactly one choice, got {chosen}", ann_id, task_id)
    label = chosen[0]
    if label not in config.labels:
        raise AnnotationSkipped(f"label {label!r} is not in the label config {config.labels}", ann_id, task_id)
    return label


#: What a missing or unreadable timestamp counts as: before any other.
NEVER = datetime.min.replace(tzinfo=UTC)


def ls_moment(stamp: Any) -> datetime:
    """A Label Studio timestamp as an aware datetime (NEVER when missing or unreadable).

    Not compared as strings: LS (Django REST framework) drops the fraction when the microseconds are 0
    (``...T10:00:05Z``), and that stamp sorts as a string after a later one of the same second (``...05.3Z``).
    """
    return (parse_time(stamp) if isinstance(stamp, str) else None) or NEVER


def _recency(annotation: Mapping[str, Any]) -> tuple[datetime, datetime, int]:
    # The id breaks ties (it grows with creation).
    ann_id = annotation.get("id")
    return (ls_moment(annotation.get("updated_at")), ls_moment(annotation.get("created_at")),
            ann_id if isinstance(ann_id, int) else -1)


def task_label(task: Mapping[str, Any], config: ClassificationConfig) -> str:
    """Label of the task's latest non-cancelled annotation (the annotator's last word), or AnnotationSkipped.

    An unusable latest annotation is NOT replaced by an older one: the newer one supersedes it.
    """
    annotation = dict(latest_annotation(task))
    annotation.setdefault("task", task.get("id"))
    return annotation_label(annotation, config)


def latest_annotation(task: Mapping[str, Any]) -> Mapping[str, Any]:
    """The task's latest non-cancelled annotation, or AnnotationSkipped saying why there is none."""
    task_id = task.get("id")
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, Mapping)]
    if not annotations:
        raise AnnotationSkipped("task has no annotations", task_id=task_id)
    live = [a for a in annotations if not a.get("was_cancelled")]
    if not live:
        raise AnnotationSkipped(CANCELLED, task_id=task_id)
    return max(live, key=_recency)


def prediction_result(config: ClassificationConfig, label: str) -> list[dict[str, Any]]:
    """The LS `result` of a pre-label choosing `label` (the shape ml_predict.json shows)."""
    if label not in config.labels:
        raise ValueError(f"label {label!r} is not in the label config {config.labels}")
    return [{"from_name": config.choices_name, "to_name": config.image_name, "type": "choices",
             "value": {"choices": [label]}}]


def describe_result(result: Sequence[Mapping[str, Any]]) -> str:
    """A short text of a ``result`` (a pre-label) for people: the choices, or the boxes per label."""
    choices: list[str] = []
    boxes: dict[str, int] = {}
    for item in result:
        value = item.get("value") if isinstance(item, Mapping) else None
        if not isinstance(value, Mapping):
            continue
        if isinstance(value.get("choices"), list):
            choices.extend(str(c) for c in value["choices"])
        for label in value.get("rectanglelabels") or []:
            boxes[str(label)] = boxes.get(str(label), 0) + 1
    parts = list(choices)
    if boxes:
        total = sum(boxes.values())
        counts = ", ".join(f"{label} x{n}" for label, n in sorted(boxes.items(), key=lambda kv: (-kv[1], kv[0])))
        parts.append(f"{total} box{'es' if total != 1 else ''}: {counts}")
    return "; ".join(parts)


def rank_scores(n: int) -> list[float]:
    """Scores for influence ranks 0..n-1 (0 = most valuable): strictly increasing, all within [0, 1].

    LS "Uncertainty sampling" serves the LOWEST score first, and silently drops predictions whose score is
    outside [0, 1], so rank r maps to r / (n - 1): 0.0 for the best task, 1.0 for the last.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 1:
        return [0.0]
    return [r / (n - 1) for r in range(n)]


def build_predictions(config: ClassificationConfig | None, model_version: str,
                      ranked: Sequence[tuple[int, str | None]] | Iterable[tuple[int, str | None]]
                      ) -> list[dict[str, Any]]:
    """Predictions for one scoring round: `ranked` is (task_id, pre-label or None), most valuable first.

    A None label (or no config) gives `result: []`, which LS accepts: the prediction then only orders the stream.
    """
    if not model_version:
        raise ValueError("model_version must be a non-empty string")
    items = list(ranked)
    scores = rank_scores(len(items))
    out = []
    for (task_id, label), score in zip(items, scores, strict=True):
        result = prediction_result(config, label) if (label is not None and config is not None) else []
        out.append({"task": int(task_id), "model_version": model_version, "score": score, "result": result})
    return out
