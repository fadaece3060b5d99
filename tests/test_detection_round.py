"""The detection task kind without Label Studio: annotations -> boxes (every bad input reported, none fatal),
task images through the kind's own loader, pre-labels back to percent, and the backend's round on BCCD
images in an offline datastore: cold start, ISAL, a warm start, baselines, stored influence reused."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from isal_backend.bench.datasets import label_config, png_bytes
from isal_backend.bench.offline import OfflineDatastore
from isal_backend.bench.voc import BCCD_ARCHIVE_NAME, load_bccd
from isal_backend.detection.boxes import boxes_to_regions, regions_to_boxes
from isal_backend.jobs.entry import stored_predictions
from isal_backend.labelstudio.config import DetectionConfig
from isal_backend.labelstudio.convert import AnnotationSkipped, describe_result
from isal_backend.round import Round
from isal_backend.settings import Settings, SettingsError
from isal_backend.store import ModelStore
from isal_backend.summary import Summaries
from isal_backend.tasks import TaskParts
from isal_backend.tasks import artifacts as keys
from isal_backend.tasks.detection import DetectionTask, Sample, prelabel, shrink, task_boxes
from tests.datafiles import data_file

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
    return Settings(model_dir=tmp_path, **{"detection_image_size": 64, **extra})


def detection_task(tmp_path: Path, config: DetectionConfig = CONFIG, **extra: Any) -> DetectionTask:
    s = settings(tmp_path, **extra)
    return DetectionTask(config, TaskParts(s, 7, tmp_path / "projects" / "7"))


def test_features_report_every_bad_task_and_keep_the_rest(tmp_path: Path) -> None:
    tasks = [
        {"id": 1, "data": {"image": data_url()}, "annotations": []},
        {"id": 2, "data": {"image": data_url()}, "annotations": task([region("a", 10, 10, 50, 50)])["annotations"]},
        {"id": 3, "data": {"image": data_url(raw=b"not an image")}, "annotations": []},
        {"id": 4, "data": {}, "annotations": []},
        {"id": 5, "data": {"image": data_url()},
         "annotations": task([region("r", 1, 1, 5, 5, rotation=90)])["annotations"]},
        {"id": 6, "data": {"image": data_url()},
         "annotations": task([region("s", 1, 1, 5, 5, "Neutrophil")])["annotations"]},
        {"id": 8, "data": {"image": data_url()},
         "annotations": task([region("c", 1, 1, 5, 5)], was_cancelled=True)["annotations"]},
    ]
    kind = detection_task(tmp_path)

    def no_download(reference: str) -> bytes:
        raise AssertionError(f"data URLs are decoded locally, not fetched: {reference[:30]}")

    data = kind.features(kind.split(tasks), no_download, None)
    assert [s.task_id for s in data.pool] == [1] and data.pool_ids == [1]
    assert [s.task_id for s in data.labeled] == [2, 6] and data.labeled_ids == [2, 6]
    reasons = {s["task"]: s["reason"] for s in data.skipped}
    assert set(reasons) == {3, 4, 5, 8}
    assert "image could not be loaded" in reasons[3] and "no image under data.image" in reasons[4]
    assert "rotated" in reasons[5] and "cancelled" in reasons[8]
    assert [(n["task"], n["kind"]) for n in data.notes] == [(6, "unknown_label")]
    # 200x100 shrunk to 64x32: the box is scaled with it, and stays in percent of the same image.
    sample = data.labeled[0]
    assert sample.image.shape == (3, 32, 64) and sample.original_size == (200, 100)
    assert torch.allclose(sample.target["boxes"].double(), torch.tensor([[6.4, 3.2, 38.4, 19.2]], dtype=torch.float64))


def test_prelabels_go_back_to_percent_of_the_decoded_image_with_scores() -> None:
    original = Image.new("RGB", (641, 479))
    sample = Sample(1, "ref", shrink(original, 320), original.size)
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


class BccdProject:
    """The first ``n`` BCCD images (shrunk to ``side``) as an offline project: PNG bytes, true boxes in percent."""

    def __init__(self, n: int, side: int, project_id: int = 7) -> None:
        bccd = load_bccd(data_file(BCCD_ARCHIVE_NAME), limit=n, max_side=side)
        self.classes = list(bccd.classes)
        self.blobs = {f"bccd-{i}": png_bytes(np.ascontiguousarray(im.permute(1, 2, 0).numpy()))
                      for i, im in enumerate(bccd.images)}
        self.truth = {i + 1: boxes_to_regions(t["boxes"].double(), t["labels"], self.classes, im.shape[2],
                                              im.shape[1]) for i, (t, im) in enumerate(zip(bccd.targets,
                                                                                             bccd.images,
                                                                                             strict=True))}
        self.datastore = OfflineDatastore(project_id, label_config("detection", self.classes),
                                          {i + 1: f"bccd-{i}" for i in range(n)}, self.blobs.__getitem__)

    def annotate(self, task_ids: range) -> None:
        for i in task_ids:
            self.datastore.annotate(i, self.truth[i])


def test_isal_round_on_real_images_with_cold_start_and_warm_start(tmp_path: Path) -> None:
    """Real BCCD images, a real (short) training: cold start below 3 images, then ISAL, then a warm start."""
    torch.set_num_threads(2)
    project = BccdProject(14, 128)
    store = ModelStore(tmp_path)
    s = settings(tmp_path, detection_steps=4, detection_first_steps=4, detection_image_size=128)
    project.annotate(range(1, 3))
    cold = Round(7, project.datastore, store, s).run()
    assert cold["order"].startswith("cold-start") and "2 usable annotated images" in cold["cold_start_reason"]
    assert cold["written"] == 12 and cold["kind"] == "detection"

    project.annotate(range(3, 7))
    first = Round(7, project.datastore, store, s).run()
    assert first["order"].startswith("isal:") and first["warm_start"] is False and first["train_steps"] == 4
    assert first["train_size"] + first["reference_size"] == 6 and first["reference_size"] >= 1
    assert "strategy_note" not in first and 0 <= first["no_box"] <= 8 and first["written"] == 8
    stored = store.load(7)
    assert stored is not None and stored.meta["kind"] == "detection"
    assert any(k.startswith(keys.DETECTOR_PREFIX) for k in stored.tensors) and keys.S_TEST in stored.tensors
    assert stored.tensors[keys.POOL_KEYS].numel() == 8 and torch.isfinite(stored.tensors[keys.POOL_KEYS]).all()

    # Rescoring the pool with the stored round (what /predict and new tasks do) puts the round's order at the
    # bottom of its own score distribution, in order: most negative influence first.
    kind = DetectionTask(DetectionConfig("image", "image", "label", project.classes),
                         TaskParts(s, 7, store.project_dir(7)))
    model = kind.load(stored)
    pool = [t for t in project.datastore.tasks() if not t["annotations"]]
    predictions, skipped = stored_predictions(kind, model, pool, project.datastore.image, stored.round_id)
    assert skipped == [] and [p["task"] for p in predictions] == [t["id"] for t in pool]
    by_task = {p["task"]: p["score"] for p in predictions}
    assert [by_task[t] for t in first["top_tasks"]] == pytest.approx([j / 8 for j in range(8)])
    assert all(r["type"] == "rectanglelabels" and 0.0 <= r["score"] <= 1.0 for p in predictions for r in p["result"])
    assert project.datastore.prediction(first["top_tasks"][0])["score"] == 0.0  # the stream serves it first

    # What the dashboard shows: boxes per class labeled and predicted over the pool, the stream's head.
    def per_class(results: Any) -> dict[str, int]:
        names = [r["value"]["rectanglelabels"][0] for result in results for r in result]
        return {c: names.count(c) for c in project.classes}

    assert cold["classes"] == {"unit": "boxes", "labeled": per_class(project.truth[i] for i in (1, 2))}
    assert first["classes"]["labeled"] == per_class(project.truth[i] for i in range(1, 7))
    written = [project.datastore.prediction(t)["result"] for t in first["top_tasks"]]
    assert first["classes"]["pool_predicted"] == per_class(written)  # every pool image was written back
    assert [h["task"] for h in first["stream_head"]] == first["top_tasks"] and first["stream_key"] == "influence"
    for head, result in zip(first["stream_head"], written, strict=True):
        assert head["prelabel"] == describe_result(result) and len(head["thumbnail"]) == 40
        if result:
            assert head["prelabel"].startswith(f"{len(result)} box")

    # The second round reads every body output from the project's cache (written by the first round's
    # commit): the same images need no backbone pass at all; the detector warm-starts.
    second = Round(7, project.datastore, store, s).run()
    assert second["warm_start"] is True and second["body_cache"]["loaded"] > 0
    assert second["body_cache"]["loaded"] == first["body_cache"]["loaded"] + first["body_cache"]["computed"]
    assert second["body_cache"]["computed"] == 0

    # The dashboard's summary of these rounds: mAP@0.5 on the held-out images, one point per round with a detector.
    summary = Summaries(s).project(7)
    assert summary["metric"]["label"] == "held-out mAP@0.5" and summary["classes"]["unit"] == "boxes"
    assert [(c["round_id"], c["value"]) for c in summary["curve"]] == [
        (r["round_id"], r["validation_map50"]) for r in (first, second)]
    assert [r["round_id"] for r in summary["rounds"]] == [cold["round_id"], first["round_id"], second["round_id"]]


@pytest.mark.parametrize(("strategy", "order"), [("random", "random"), ("margin", "mean-confidence"),
                                                 ("coreset", "coreset")])
def test_baseline_strategies_order_a_detection_project_with_the_same_trained_detector(
    tmp_path: Path, strategy: str, order: str
) -> None:
    torch.set_num_threads(2)
    project = BccdProject(10, 96, project_id=3)
    project.annotate(range(1, 7))
    store = ModelStore(tmp_path)
    s = settings(tmp_path, detection_steps=2, detection_first_steps=2, detection_image_size=96, strategy=strategy)
    report = Round(3, project.datastore, store, s, write_size=3).run()
    assert report["order"].startswith(order) and report["train_steps"] == 2
    assert ("strategy_note" in report) == (strategy == "margin")
    assert report["written"] == 3 and len(set(report["top_tasks"])) == 3 and set(report["top_tasks"]) <= {7, 8, 9, 10}
    stored = store.load(3)
    assert any(k.startswith(keys.DETECTOR_PREFIX) for k in stored.tensors) and keys.S_TEST not in stored.tensors
    kind = DetectionTask(DetectionConfig("image", "image", "label", project.classes),
                         TaskParts(s, 3, store.project_dir(3)))
    pool = [t for t in project.datastore.tasks() if not t["annotations"]]
    predictions, skipped = stored_predictions(kind, kind.load(stored), pool, project.datastore.image,
                                              stored.round_id)
    assert skipped == [] and len(predictions) == 4
    scores = [p["score"] for p in predictions]
    if strategy == "margin":  # mean confidence places new tasks among the round's pool
        assert sorted(scores) == pytest.approx([j / 4 for j in range(4)])
    else:  # random and core-set orders are set-wise: nothing to place a new task by
        assert scores == [0.5] * 4


def test_influence_over_the_configured_convs_is_stored_and_reused_for_new_tasks(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    project = BccdProject(9, 96, project_id=5)
    project.annotate(range(1, 7))
    store = ModelStore(tmp_path)
    s = settings(tmp_path, detection_steps=2, detection_first_steps=2, detection_image_size=96,
                 detection_params=("cls_logits",))
    report = Round(5, project.datastore, store, s).run()
    stored = store.load(5)
    weight = stored.tensors[keys.DETECTOR_PREFIX + "head.classification_head.cls_logits.weight"]
    assert report["influence_params"] == ["cls_logits"] and stored.tensors[keys.S_TEST].numel() == weight.numel() + 3
    # A later setting does not change how the stored round scores: its s_test is laid out over cls_logits.
    later = settings(tmp_path, detection_image_size=96)
    kind = DetectionTask(DetectionConfig("image", "image", "label", project.classes),
                         TaskParts(later, 5, store.project_dir(5)))
    pool = [t for t in project.datastore.tasks() if not t["annotations"]]
    predictions, skipped = stored_predictions(kind, kind.load(stored), pool, project.datastore.image,
                                              stored.round_id)
    assert skipped == [] and len(predictions) == 3 and all(0.0 <= p["score"] <= 1.0 for p in predictions)
