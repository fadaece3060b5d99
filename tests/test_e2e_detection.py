"""End to end for object detection: a real Label Studio 1.23.2, the backend under gunicorn, a real RQ worker.

A detection project (``<RectangleLabels>``) with 36 real BCCD blood-cell images uploaded as files, 12 of
them annotated through the API with their Pascal VOC boxes in percent (one box rotated, one labeled
with a class the config lacks: both must be reported, neither may break the round). The backend is
connected afterwards and "Start training" runs one round: the detector trains, every unlabeled task
gets a prediction of the round with boxes and scores, and the labeling stream serves them in
influence order, lock-aware for a second annotator.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from isal_backend.bench.voc import BCCD_ARCHIVE_NAME, load_bccd
from isal_backend.detection.boxes import pixels_to_percent
from tests.datafiles import data_file
from tests.test_e2e_classification import Stack, create_annotator, next_task, wait_for_round

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

IMAGES = 36
ANNOTATED = 12
CLASSES = ("RBC", "WBC", "Platelets")
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    + "".join(f'<Label value="{c}"/>' for c in CLASSES)
    + "</RectangleLabels></View>"
)


def bccd_files() -> list[tuple[str, bytes, list[dict[str, Any]]]]:
    """(file name, JPEG bytes at 320 px, Label Studio regions in percent from the VOC boxes) per image."""
    data = load_bccd(data_file(BCCD_ARCHIVE_NAME), limit=IMAGES, max_side=320)
    out = []
    for name, image, target in zip(data.names, data.images, data.targets, strict=True):
        height, width = image.shape[1:]
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
        regions = []
        for j, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True)):
            x, y, w, h = pixels_to_percent(*box, width, height)
            regions.append({"id": f"r{j}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                            "original_width": width, "original_height": height, "image_rotation": 0,
                            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                      "rectanglelabels": [CLASSES[label]]}})
        out.append((f"{name}.jpg", buf.getvalue(), regions))
    return out


def downloads(stack: Stack, project: int) -> int:
    """Images fetched from Label Studio over all of the project's stored rounds (at most five are kept)."""
    rounds = Path(stack.model_dir / "projects" / str(project) / "rounds")
    return sum(json.loads((r / "report.json").read_text()).get("images_downloaded", 0)
               for r in rounds.iterdir() if (r / "report.json").exists())


@pytest.fixture(scope="module")
def stack(label_studio: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(label_studio, tmp_path_factory.mktemp("e2e-detection"))
    s.env.update({"ISAL_WRITE_TOP_M": "0", "ISAL_DETECTION_STEPS": "30", "ISAL_DETECTION_FIRST_STEPS": "30",
                  "ISAL_DETECTION_IMAGE_SIZE": "256"})
    s.start()
    try:
        yield s
    finally:
        s.close()


def test_detection_stream_follows_isal_end_to_end(stack: Stack) -> None:
    ls = stack.ls
    project = stack.api("POST", "/api/projects", json={"title": "isal detection e2e",
                                                        "label_config": LABEL_CONFIG})["id"]
    files = bccd_files()
    # one form field per file: Label Studio keeps only one file per field name (and refuses > 100 per request)
    stack.api("POST", f"/api/projects/{project}/import",
              files=[(f"file{i}", (name, data, "image/jpeg")) for i, (name, data, _) in enumerate(files)])
    tasks = stack.api("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]
    assert len(tasks) == IMAGES
    # Label Studio stores an upload as "<8 hex>-<original name>".
    regions_of = {name: regions for name, _, regions in files}
    task_of = {t["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[1]: t["id"] for t in tasks}
    names = sorted(task_of)

    annotated = [task_of[n] for n in names[:ANNOTATED]]
    rotated_task, stranger_task = annotated[0], annotated[1]
    for name in names[:ANNOTATED]:
        result = [dict(r, value=dict(r["value"])) for r in regions_of[name]]
        if task_of[name] == rotated_task:
            result[0]["value"]["rotation"] = 30
        if task_of[name] == stranger_task:
            result[0]["value"]["rectanglelabels"] = ["Neutrophil"]
        stack.api("POST", f"/api/tasks/{task_of[name]}/annotations", json={"result": result})

    ml = stack.api("POST", "/api/ml", json={"url": stack.backend.url, "project": project, "title": "isal"})
    assert ml["id"]  # /setup accepted the RectangleLabels config
    stack.api("POST", f"/api/ml/{ml['id']}/train", json={})
    report = wait_for_round(stack, project, lambda r: r.get("labeled") == ANNOTATED - 1, timeout_s=300)
    round_id = report["round_id"]

    assert report["kind"] == "detection" and report["order"].startswith("isal:"), report
    assert report["unlabeled"] == IMAGES - ANNOTATED and report["written"] == IMAGES - ANNOTATED
    assert report["no_box"] == 0 and report["train_steps"] == 30
    # Each image crosses the network once: /setup's round and /train's may both have run (which one
    # is the last depends on timing), and the later one reads the earlier one's downloads from the cache.
    assert report["images_downloaded"] + report["image_cache_hits"] == IMAGES
    assert downloads(stack, project) == IMAGES
    skipped = {s["task"]: s["reason"] for s in report["skipped"]}
    assert list(skipped) == [rotated_task] and "rotated rectangle (30 degrees) refused" in skipped[rotated_task]
    strangers = [n for n in report["notes"] if n["kind"] == "unknown_label"]
    assert [n["task"] for n in strangers] == [stranger_task] and "'Neutrophil'" in strangers[0]["message"]

    # Every unlabeled task holds a prediction of the round, with boxes and per-box scores.
    predictions = [p for p in stack.api("GET", "/api/predictions", params={"project": project})
                   if p["model_version"] == round_id]
    unlabeled = {t["id"] for t in tasks} - set(annotated)
    assert {p["task"] for p in predictions} == unlabeled and len(predictions) == len(unlabeled)
    for p in predictions:
        assert p["result"], f"task {p['task']} has no box"
        for r in p["result"]:
            v = r["value"]
            assert r["type"] == "rectanglelabels" and v["rectanglelabels"][0] in CLASSES
            assert 0.5 <= r["score"] <= 1.0 and v["rotation"] == 0
            assert v["x"] >= -1e-6 and v["x"] + v["width"] <= 100 + 1e-6 and v["width"] > 0
            assert v["y"] >= -1e-6 and v["y"] + v["height"] <= 100 + 1e-6 and v["height"] > 0
            assert (r["original_width"], r["original_height"]) == (320, 240)
    by_score = [p["task"] for p in sorted(predictions, key=lambda p: p["score"])]
    assert by_score[:20] == report["top_tasks"]
    state = stack.api("GET", f"/api/projects/{project}")
    assert state["sampling"] == "Uncertainty sampling" and state["model_version"] == round_id

    # The stream: most valuable first; a second annotator gets the second (the first is locked).
    assert next_task(ls, project, ls.token) == by_score[0]
    second = create_annotator(ls, f"det-{uuid.uuid4().hex[:6]}@example.com")
    assert next_task(ls, project, second) == by_score[1]

    # /predict for an unlabeled task: the round's detector draws boxes, with an ISAL-derived score.
    full_task = stack.api("GET", f"/api/tasks/{by_score[-1]}")
    answer = requests.post(f"{stack.backend.url}/predict", json={"tasks": [full_task], "project": f"{project}.1",
                                                                  "label_config": LABEL_CONFIG}, timeout=120).json()
    result = answer["results"][0]
    assert result["model_version"] == round_id and 0.0 <= result["score"] <= 1.0
    assert result["result"] and all(r["type"] == "rectanglelabels" for r in result["result"])
    assert Path(stack.model_dir / "projects" / str(project) / "CURRENT").read_text().strip() == round_id

    # The annotator labels the first task served: the webhook starts a second round, which warm-starts
    # from the first round's detector and reads every image from the project's image cache.
    name = next(n for n, t in task_of.items() if t == by_score[0])
    stack.api("POST", f"/api/tasks/{by_score[0]}/annotations", json={"result": regions_of[name]})
    second_round = wait_for_round(stack, project, lambda r: r.get("labeled") == ANNOTATED, timeout_s=300)
    assert second_round["round_id"] != round_id and second_round["warm_start"] is True
    assert (second_round["images_downloaded"], second_round["image_cache_hits"]) == (0, IMAGES)
    assert downloads(stack, project) == IMAGES
