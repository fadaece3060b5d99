"""The detection round's pieces without Label Studio: annotations -> boxes (every bad input reported, none
fatal), task images through the round's own loader, the reference split, pre-labels back to percent, and
a short real training + ISAL ordering on BCCD images with a warm start from the stored detector."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from isal_backend.detection.boxes import regions_to_boxes
from isal_backend.detection.voc import BCCD_ARCHIVE, load_bccd
from isal_backend.jobs.detection_round import (
    DETECTOR_PREFIX,
    DetectionData,
    DetectionRound,
    Sample,
    prelabel,
    shrink,
    task_boxes,
)
from isal_backend.labelstudio.config import DetectionConfig
from isal_backend.labelstudio.convert import AnnotationSkipped
from isal_backend.settings import Settings, SettingsError

CONFIG = DetectionConfig(image_name="image", image_value_key="image", labels_name="label",
                         labels=["RBC", "WBC", "Platelets"])


def region(rid: str, x: float, y: float, w: float, h: float, label: str = "RBC", **extra: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}
    value.update(extra)
    return {"id": rid, "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": 9999, "original_height": 9999, "value": value}


def task(result: list[dict[str, Any]], task_id: int = 1, **annotation: Any) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": "x"},
            "annotations": [{"id": 10, "result": result, "updated_at": "2025-01-01T00:00:00Z", **annotation}]}


def test_percent_boxes_become_pixels_of_the_decoded_image() -> None:
    boxes, labels, issues = task_boxes(task([region("a", 10, 20, 30, 40), region("b", 0, 0, 50, 50, "WBC")]),
                                       CONFIG, 640, 480)
    # Against the decoded 640x480, not the region's (stale) original_width/height of 9999.
    assert torch.allclose(boxes, torch.tensor([[64.0, 96, 256, 288], [0, 0, 320, 240]], dtype=torch.float64))
    assert labels.tolist() == [0, 1] and issues == []


def test_bad_boxes_are_repaired_or_dropped_and_named() -> None:
    result = [
        region("inside", 10, 10, 10, 10),
        region("outside", 90, 90, 20, 20),  # reaches past the right and bottom edges
        region("flat", 10, 10, 0, 10),  # zero width
        region("stranger", 10, 10, 10, 10, "Neutrophil"),  # not in the config
        {"id": "other", "from_name": "comment", "to_name": "image", "type": "textarea", "value": {"text": ["hi"]}},
    ]
    boxes, labels, issues = task_boxes(task(result), CONFIG, 100, 100)
    assert boxes.tolist() == [[10, 10, 20, 20], [90, 90, 100, 100]] and labels.tolist() == [0, 0]
    by_kind = {i.kind: i.message for i in issues}
    assert set(by_kind) == {"clipped", "zero_area", "unknown_label", "ignored"}
    assert "region outside" in by_kind["clipped"] and "region flat" in by_kind["zero_area"]
    assert "'Neutrophil'" in by_kind["unknown_label"] and "region stranger" in by_kind["unknown_label"]
    assert "'comment'" in by_kind["ignored"]


@pytest.mark.parametrize(
    ("result", "fragment"),
    [
        ([region("ok", 1, 1, 5, 5), region("tilted", 10, 10, 10, 10, rotation=30)], "region tilted: rotated"),
        ([{"id": "bad", "from_name": "label", "type": "rectanglelabels", "value": {"x": "left"}}],
         "region bad: missing or non-numeric"),
    ],
)
def test_rotated_or_malformed_rectangles_refuse_the_annotation(result: list[dict[str, Any]], fragment: str) -> None:
    with pytest.raises(AnnotationSkipped) as err:
        task_boxes(task(result), CONFIG, 100, 100)
    assert fragment in err.value.reason and "not trained on" in err.value.reason


def test_empty_annotation_means_no_objects_and_cancelled_or_latest_rules_hold() -> None:
    boxes, labels, issues = task_boxes(task([]), CONFIG, 100, 100)
    assert boxes.shape == (0, 4) and labels.numel() == 0 and issues == []
    with pytest.raises(AnnotationSkipped, match="cancelled"):
        task_boxes(task([region("a", 1, 1, 5, 5)], was_cancelled=True), CONFIG, 100, 100)
    two = {"id": 1, "data": {}, "annotations": [
        {"id": 1, "result": [region("old", 1, 1, 5, 5)], "updated_at": "2025-01-01T00:00:00Z"},
        {"id": 2, "result": [region("new", 50, 50, 10, 10, "WBC")], "updated_at": "2025-02-01T00:00:00Z"}]}
    boxes, labels, _ = task_boxes(two, CONFIG, 100, 100)
    assert boxes.tolist() == [[50, 50, 60, 60]] and labels.tolist() == [1]


def data_url(image: Image.Image | None = None, raw: bytes | None = None) -> str:
    if raw is None:
        buf = io.BytesIO()
        (image or Image.new("RGB", (200, 100), (120, 30, 30))).save(buf, format="PNG")
        raw = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def settings(tmp_path: Path, **extra: Any) -> Settings:
    # The client is never asked for anything here: images are data URLs, decoded locally.
    return Settings(label_studio_url="http://127.0.0.1:9", label_studio_api_key="0" * 40, model_dir=tmp_path,
                    **{"detection_image_size": 64, **extra})


def test_split_reports_every_bad_task_and_keeps_the_rest(tmp_path: Path) -> None:
    tasks = [
        {"id": 1, "data": {"image": data_url()}, "annotations": []},
        {"id": 2, "data": {"image": data_url()}, "annotations": task([region("a", 10, 10, 50, 50)])["annotations"]},
        {"id": 3, "data": {"image": data_url(raw=b"not an image")}, "annotations": []},
        {"id": 4, "data": {}, "annotations": []},
        {"id": 5, "data": {"image": data_url()},
         "annotations": task([region("r", 1, 1, 5, 5, rotation=90)])["annotations"]},
        {"id": 6, "data": {"image": data_url()},
         "annotations": task([region("s", 1, 1, 5, 5, "Neutrophil")])["annotations"]},
    ]
    data = DetectionRound(7, settings(tmp_path)).split(CONFIG, tasks)
    assert [s.task["id"] for s in data.unlabeled] == [1]
    assert [s.task["id"] for s in data.labeled] == [2, 6]
    reasons = {s["task"]: s["reason"] for s in data.skipped}
    assert set(reasons) == {3, 4, 5}
    assert "image could not be loaded" in reasons[3] and "no image under data.image" in reasons[4]
    assert "rotated" in reasons[5]
    assert [(n["task"], n["kind"]) for n in data.notes] == [(6, "unknown_label")]
    # 200x100 shrunk to 64x32: the box is scaled with it, and stays in percent of the same image.
    sample = data.labeled[0]
    assert sample.image.shape == (3, 32, 64) and sample.original_size == (200, 100)
    assert torch.allclose(sample.target["boxes"].double(), torch.tensor([[6.4, 3.2, 38.4, 19.2]], dtype=torch.float64))


def test_prelabels_go_back_to_percent_of_the_decoded_image_with_scores() -> None:
    original = Image.new("RGB", (641, 479))
    sample = Sample({"id": 1}, "ref", shrink(original, 320), original.size)
    assert sample.image.shape == (3, 239, 320)
    detection = {"boxes": torch.tensor([[32.0, 24.0, 160.0, 120.0], [0.0, 0.0, 10.0, 10.0]]),
                 "labels": torch.tensor([2, 0]), "scores": torch.tensor([0.9, 0.3])}
    result = prelabel(detection, sample, CONFIG, threshold=0.5)
    assert len(result) == 1 and result[0]["score"] == pytest.approx(0.9)
    assert result[0]["value"]["rectanglelabels"] == ["Platelets"] and result[0]["from_name"] == "label"
    assert (result[0]["original_width"], result[0]["original_height"]) == (641, 479)
    back = regions_to_boxes(result, CONFIG.labels)
    sx, sy = 320 / 641, 239 / 479
    expected = torch.tensor([[32 / sx, 24 / sy, 160 / sx, 120 / sy]], dtype=torch.float64)
    assert torch.allclose(back.boxes, expected, atol=1e-9) and back.issues == []


def test_detection_settings_are_read_and_validated() -> None:
    s = Settings.from_env({})
    assert (s.detection_score_threshold, s.detection_steps, s.detection_image_size) == (0.5, 60, 320)
    s = Settings.from_env({"ISAL_DETECTION_SCORE_THRESHOLD": "0.3", "ISAL_DETECTION_STEPS": "5",
                           "ISAL_DETECTION_IMAGE_SIZE": "256"})
    assert (s.detection_score_threshold, s.detection_steps, s.detection_image_size) == (0.3, 5, 256)
    assert s.detection_params == ("cls_logits", "bbox_reg", "bbox_ctrness") and s.detection_cache_mb == 2048
    assert Settings.from_env({"ISAL_DETECTION_CACHE_MB": "0"}).detection_cache_mb == 0
    assert Settings.from_env({"ISAL_DETECTION_PARAMS": " cls_logits,BBOX_CTRNESS"}).detection_params == (
        "cls_logits", "bbox_ctrness")
    for name, value in (("ISAL_DETECTION_SCORE_THRESHOLD", "1.5"), ("ISAL_DETECTION_STEPS", "0"),
                        ("ISAL_DETECTION_IMAGE_SIZE", "16"), ("ISAL_DETECTION_PARAMS", "cls_logits,cls_logits"),
                        ("ISAL_DETECTION_PARAMS", "backbone"), ("ISAL_DETECTION_PARAMS", "cls_logits,,bbox_reg"),
                        ("ISAL_DETECTION_CACHE_MB", "-1")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


@pytest.mark.skipif(not BCCD_ARCHIVE.exists(), reason="needs ../shared/data/bccd-voc.tar.gz")
def test_isal_order_on_real_images_with_cold_start_and_warm_start(tmp_path: Path) -> None:
    """Real BCCD images, a real (short) training: cold start below 3 images, then ISAL, then a warm start."""
    torch.set_num_threads(2)
    bccd = load_bccd(limit=14, max_side=128)
    config = DetectionConfig("image", "image", "label", list(bccd.classes))
    round_ = DetectionRound(7, settings(tmp_path, detection_steps=4, detection_image_size=128))

    def samples(indices: range, labeled: bool) -> list[Sample]:
        out = []
        for i in indices:
            im = bccd.images[i]
            out.append(Sample({"id": i}, f"bccd-{i}", im, (im.shape[2], im.shape[1]),
                              bccd.targets[i] if labeled else None))
        return out

    pool = samples(range(6, 14), labeled=False)
    report: dict[str, Any] = {}
    order, detections = round_.rank_pool(DetectionData(config, samples(range(2), True), pool), 8, {}, report)
    assert report["order"].startswith("cold-start") and "2 usable annotated images" in report["cold_start_reason"]
    assert detections is None and sorted(order.tolist()) == list(range(8))

    tensors: dict[str, torch.Tensor] = {}
    report = {}
    order, detections = round_.rank_pool(DetectionData(config, samples(range(6), True), pool), 5, tensors, report)
    assert report["order"].startswith("isal:") and report["warm_start"] is False
    assert report["train_size"] + report["reference_size"] == 6 and report["train_steps"] == 4
    assert report["reference_size"] >= 1 and "strategy_note" not in report
    scores = tensors["pool_scores_sorted"]
    assert scores.numel() == 8 and torch.isfinite(scores).all()
    assert len(order) == 5 and len(set(order.tolist())) == 5 and len(detections) == 8
    assert 0 <= report["no_box"] <= 8

    # Rescoring the pool with the stored round (what /predict and new tasks do) puts the chosen five at
    # the bottom of the round's own score distribution, in order: most negative influence first.
    round_.store.commit(7, "r1", tensors, report)
    stored = round_.store.load(7)
    assert stored is not None and any(k.startswith(DETECTOR_PREFIX) for k in stored.tensors)
    as_tasks = [{"id": s.task["id"], "data": {"image": data_url(Image.fromarray(
        np.ascontiguousarray(s.image.permute(1, 2, 0).numpy())))}} for s in pool]
    predictions, skipped = round_.predictions_for(stored, config, as_tasks)
    assert skipped == [] and [p["task"] for p in predictions] == [s.task["id"] for s in pool]
    mapped = [predictions[i]["score"] for i in order.tolist()]
    assert mapped == pytest.approx([j / 8 for j in range(5)])
    assert all(r["type"] == "rectanglelabels" and 0.0 <= r["score"] <= 1.0 for p in predictions for r in p["result"])

    assert report["body_cache"]["loaded"] == 0 and report["body_cache"]["added"] > 0

    # The second round reads every body output from the project's cache: the same images (and, with
    # the same training seed, the same flips) need no backbone pass at all.
    warm_report: dict[str, Any] = {}
    round_.rank_pool(DetectionData(config, samples(range(6), True), pool), 5, {}, warm_report)
    assert warm_report["warm_start"] is True
    assert warm_report["body_cache"] == {"loaded": report["body_cache"]["added"], "added": 0}


@pytest.mark.skipif(not BCCD_ARCHIVE.exists(), reason="needs ../shared/data/bccd-voc.tar.gz")
@pytest.mark.parametrize(("strategy", "order"), [("random", "random"), ("margin", "mean-confidence"),
                                                 ("coreset", "coreset")])
def test_baseline_strategies_order_a_detection_project_with_the_same_trained_detector(
    tmp_path: Path, strategy: str, order: str
) -> None:
    torch.set_num_threads(2)
    bccd = load_bccd(limit=10, max_side=96)
    config = DetectionConfig("image", "image", "label", list(bccd.classes))
    round_ = DetectionRound(3, settings(tmp_path, detection_steps=2, detection_image_size=96, strategy=strategy))
    samples = [Sample({"id": i}, f"bccd-{i}", bccd.images[i], (bccd.images[i].shape[2], bccd.images[i].shape[1]),
                      bccd.targets[i] if i < 6 else None) for i in range(10)]
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {}
    picked, detections = round_.rank_pool(DetectionData(config, samples[:6], samples[6:]), 3, tensors, report)
    assert report["order"].startswith(order) and report["train_steps"] == 2
    assert ("strategy_note" in report) == (strategy == "margin")
    assert len(picked) == 3 and len(set(picked.tolist())) == 3 and set(picked.tolist()) <= {0, 1, 2, 3}
    assert detections is not None and len(detections) == 4
    assert any(k.startswith(DETECTOR_PREFIX) for k in tensors) and "s_test" not in tensors
    round_.store.commit(3, "r-base", tensors, report)
    as_tasks = [{"id": s.task["id"], "data": {"image": data_url(Image.fromarray(
        np.ascontiguousarray(s.image.permute(1, 2, 0).numpy())))}} for s in samples[6:]]
    predictions, skipped = round_.predictions_for(round_.store.load(3), config, as_tasks)
    assert skipped == [] and [p["score"] for p in predictions] == [0.5] * 4
    if strategy == "margin":
        conf = [float(d["scores"].mean()) if len(d["scores"]) else 0.0 for d in detections]
        assert [conf[i] for i in picked.tolist()] == sorted(conf)[:3]


@pytest.mark.skipif(not BCCD_ARCHIVE.exists(), reason="needs ../shared/data/bccd-voc.tar.gz")
def test_influence_over_the_configured_convs_is_stored_and_reused_for_new_tasks(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    bccd = load_bccd(limit=9, max_side=96)
    config = DetectionConfig("image", "image", "label", list(bccd.classes))
    round_ = DetectionRound(5, settings(tmp_path, detection_steps=2, detection_image_size=96,
                                        detection_params=("cls_logits",)))
    samples = [Sample({"id": i}, f"bccd-{i}", bccd.images[i], (bccd.images[i].shape[2], bccd.images[i].shape[1]),
                      bccd.targets[i] if i < 6 else None) for i in range(9)]
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {}
    round_.rank_pool(DetectionData(config, samples[:6], samples[6:]), 3, tensors, report)
    weight = tensors[DETECTOR_PREFIX + "head.classification_head.cls_logits.weight"]
    assert report["influence_params"] == ["cls_logits"] and tensors["s_test"].numel() == weight.numel() + 3
    round_.store.commit(5, "r-cls", tensors, report)
    # A later setting does not change how the stored round scores: its s_test is laid out over cls_logits.
    round_.settings = settings(tmp_path, detection_image_size=96)
    as_tasks = [{"id": s.task["id"], "data": {"image": data_url(Image.fromarray(
        np.ascontiguousarray(s.image.permute(1, 2, 0).numpy())))}} for s in samples[6:]]
    predictions, skipped = round_.predictions_for(round_.store.load(5), config, as_tasks)
    assert skipped == [] and len(predictions) == 3 and all(0.0 <= p["score"] <= 1.0 for p in predictions)
