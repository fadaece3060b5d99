"""Annotation -> label conversion, pre-label results and rank -> score mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isal_backend.labelstudio.config import parse_label_config
from isal_backend.labelstudio.convert import (
    AnnotationSkipped,
    annotation_label,
    build_predictions,
    prediction_result,
    rank_scores,
    task_label,
)

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "label-studio-samples"
CONFIG = parse_label_config('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
                            '<Choice value="cat"/><Choice value="dog"/></Choices></View>')


def _ann(label: str | None = "cat", **kw: object) -> dict:
    result = [] if label is None else [{"from_name": "label", "to_name": "image", "type": "choices",
                                        "value": {"choices": [label]}}]
    return {"id": 1, "task": 7, "result": result, "was_cancelled": False, **kw}


def test_real_webhook_annotations() -> None:
    created = json.loads((SAMPLES / "ml_webhook_ANNOTATION_CREATED.json").read_text())["request_body"]
    updated = json.loads((SAMPLES / "ml_webhook_ANNOTATION_UPDATED.json").read_text())["request_body"]
    config = parse_label_config(created["project"]["label_config"])
    assert annotation_label(created["annotation"], config) == "dog"
    assert annotation_label(updated["annotation"], config) == "cat"


@pytest.mark.parametrize(("annotation", "reason"), [
    (_ann(was_cancelled=True), "cancelled"),
    (_ann(None), "empty"),
    ({"id": 1, "result": [{"from_name": "other", "to_name": "image", "type": "choices",
                           "value": {"choices": ["cat"]}}]}, "from_name ['other']"),
    (_ann("horse"), "'horse' is not in the label config"),
    ({"id": 1, "result": [{"from_name": "label", "value": {"choices": ["cat", "dog"]}}]}, "exactly one choice"),
    ({"id": 1, "result": [{"from_name": "label", "value": {"text": ["x"]}}]}, "no list of choices"),
])
def test_unusable_annotations_are_skipped_with_a_reason(annotation: dict, reason: str) -> None:
    with pytest.raises(AnnotationSkipped) as err:
        annotation_label(annotation, CONFIG)
    assert reason in err.value.reason
    assert err.value.annotation_id == 1


def test_task_label_uses_latest_non_cancelled_annotation() -> None:
    task = {"id": 7, "annotations": [
        _ann("cat", id=1, updated_at="2026-01-01T10:00:00Z"),
        _ann("dog", id=2, updated_at="2026-01-02T10:00:00Z"),
        _ann("cat", id=3, updated_at="2026-01-03T10:00:00Z", was_cancelled=True),
    ]}
    assert task_label(task, CONFIG) == "dog"
    # an older annotation updated later wins: updated_at, not id, decides
    task["annotations"][0]["updated_at"] = "2026-01-05T10:00:00Z"
    assert task_label(task, CONFIG) == "cat"


def test_task_label_reads_timestamps_as_times_not_strings() -> None:
    """LS drops the fraction of a stamp whose microseconds are 0; as a string it would sort after a later one."""
    task = {"id": 7, "annotations": [_ann("cat", id=2, updated_at="2026-01-01T10:00:05Z"),
                                     _ann("dog", id=1, updated_at="2026-01-01T10:00:05.300000Z")]}
    assert task_label(task, CONFIG) == "dog"


def test_task_label_skips() -> None:
    with pytest.raises(AnnotationSkipped, match="no annotations"):
        task_label({"id": 1, "annotations": []}, CONFIG)
    with pytest.raises(AnnotationSkipped, match="all annotations of the task were cancelled"):
        task_label({"id": 1, "annotations": [_ann(was_cancelled=True)]}, CONFIG)
    # the latest is unusable: do not fall back to the older, superseded label
    with pytest.raises(AnnotationSkipped, match="empty") as err:
        task_label({"id": 9, "annotations": [_ann("cat", id=1, updated_at="2026-01-01T00:00:00Z"),
                                             _ann(None, id=2, updated_at="2026-01-02T00:00:00Z")]}, CONFIG)
    assert err.value.task_id == 7  # the annotation's own task field wins over the enclosing task id


def test_prediction_result_matches_what_ls_shows() -> None:
    sample = json.loads((SAMPLES / "ml_predict.json").read_text())
    expected = sample["response"]["results"][0]["result"]
    assert prediction_result(CONFIG, "cat") == expected
    with pytest.raises(ValueError, match="not in the label config"):
        prediction_result(CONFIG, "horse")


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 10_000])
def test_rank_scores_are_strictly_increasing_within_unit_interval(n: int) -> None:
    scores = rank_scores(n)
    assert len(scores) == n
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False))
    if n:
        assert scores[0] == 0.0  # the most valuable task is served first (lowest score)


def test_rank_scores_rejects_negative() -> None:
    with pytest.raises(ValueError):
        rank_scores(-1)


def test_build_predictions() -> None:
    preds = build_predictions(CONFIG, "round-3", [(11, "dog"), (5, None), (8, "cat")])
    assert [p["task"] for p in preds] == [11, 5, 8]
    assert [p["score"] for p in preds] == [0.0, 0.5, 1.0]
    assert {p["model_version"] for p in preds} == {"round-3"}
    assert preds[0]["result"][0]["value"] == {"choices": ["dog"]}
    assert preds[1]["result"] == []
    with pytest.raises(ValueError):
        build_predictions(CONFIG, "", [(1, "cat")])
    with pytest.raises(ValueError, match="horse"):
        build_predictions(CONFIG, "r", [(1, "horse")])
