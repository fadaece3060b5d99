"""A round against a real Label Studio with bad tasks in it: each is skipped and reported, nothing crashes."""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from PIL import Image

from isal_backend.jobs.entry import live_datastore, run_round, task_parts
from isal_backend.labelstudio.client import LabelStudioUnavailable
from isal_backend.labelstudio.config import parse_project_config
from isal_backend.labelstudio.images import decode_image
from isal_backend.round import Round
from isal_backend.settings import Settings
from isal_backend.store import ModelStore
from isal_backend.tasks import task_for

pytestmark = pytest.mark.e2e

CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="red"/><Choice value="blue"/></Choices></View>')


def data_url(color: tuple[int, int, int], seed: int) -> str:
    rng = random.Random(seed)
    image = Image.new("RGB", (24, 24), color)
    for _ in range(40):
        image.putpixel((rng.randrange(24), rng.randrange(24)), (rng.randrange(256),) * 3)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def make_project(label_studio: Any, title: str, tasks: list[dict[str, str]]) -> tuple[int, dict[str, int]]:
    """A classification project with these tasks; returns its id and each image's task id."""
    headers, api = label_studio.legacy_headers, label_studio.url + "/api"
    project = requests.post(f"{api}/projects", json={"title": title, "label_config": CONFIG}, headers=headers,
                            timeout=60).json()["id"]
    r = requests.post(f"{api}/projects/{project}/import", json=tasks, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    listed = requests.get(f"{api}/tasks", params={"project": project, "page_size": 100}, headers=headers,
                          timeout=60).json()["tasks"]
    return project, {t["data"].get("image"): t["id"] for t in listed}


def annotate(label_studio: Any, task: int, label: str) -> None:
    requests.post(f"{label_studio.url}/api/tasks/{task}/annotations", json={"result": choice(label)},
                  headers=label_studio.legacy_headers, timeout=60).raise_for_status()


def test_bad_tasks_are_skipped_and_reported(label_studio: Any, tmp_path: Path) -> None:
    good = [{"image": data_url((200, 30, 30) if i % 2 else (30, 30, 200), i)} for i in range(16)]
    corrupt = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    bad = [{"image": "http://127.0.0.1:9/unreachable.png"}, {"image": corrupt}, {"image": ""}]
    project, by_image = make_project(label_studio, "faults", good + bad)
    for i in range(8):
        annotate(label_studio, by_image[good[i]["image"]], "red" if i % 2 else "blue")
    off_config = by_image[good[8]["image"]]
    annotate(label_studio, off_config, "green")

    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
                        model_dir=tmp_path, backbone="small-cnn", write_top_m=0)
    report = Round(project, live_datastore(settings, project), ModelStore(tmp_path), settings).run()

    reasons = {item["task"]: item["reason"] for item in report["skipped"]}
    assert "not in the label config" in reasons[off_config]
    assert "could not be loaded" in reasons[by_image[bad[0]["image"]]]
    assert "could not be loaded" in reasons[by_image[corrupt]]
    no_image = by_image[""]
    assert "no image under data.image" in reasons[no_image]
    assert report["labeled"] == 8 and report["unlabeled"] == 7
    assert report["written"] == 7 and report["order"].startswith("isal:")
    assert ModelStore(tmp_path).current_id(project) == report["round_id"]
    assert label_studio.token not in str(report)


def test_label_studio_unreachable_fails_with_a_clear_message(tmp_path: Path) -> None:
    secret = "0123456789abcdef0123456789abcdef01234567"
    settings = Settings(label_studio_url="http://127.0.0.1:9", label_studio_api_key=secret, model_dir=tmp_path,
                        backbone="small-cnn")
    with pytest.raises(LabelStudioUnavailable) as info:
        Round(5, live_datastore(settings, 5), ModelStore(tmp_path), settings).run()
    assert "127.0.0.1:9" in str(info.value) and secret not in str(info.value)
    assert ModelStore(tmp_path).current_id(5) is None


def test_finetune_rounds_adapt_the_backbone_and_keep_using_it(label_studio: Any, tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    images = [{"image": data_url((200, 30, 30) if i % 2 else (30, 30, 200), 1000 + i)} for i in range(14)]
    project, by_image = make_project(label_studio, "finetune", images)
    for i in range(8):
        annotate(label_studio, by_image[images[i]["image"]], "red" if i % 2 else "blue")
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "MODEL_DIR": str(tmp_path), "ISAL_BACKBONE": "small-cnn", "ISAL_TRAIN_MODE": "finetune",
           "ISAL_FINETUNE_EPOCHS": "3", "ISAL_FEATURE_DIM": "16"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    first = run_round(project)  # the queue's job, as a worker runs it
    losses = first["finetune"]["epoch_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert first["order"].startswith("isal:") and first["written"] == 6

    settings = Settings.from_env()
    store = ModelStore(tmp_path)
    datastore = live_datastore(settings, project)
    task = task_for(parse_project_config(datastore.label_config()), task_parts(settings, store, project))
    model = task.load(store.load(project))  # what /predict and new-task scoring use
    tuned, stock = task.featurizer_for(model), task.featurizer_for(None)
    assert tuned.version == model.backbone_version and stock.version == "stock"
    ref = images[10]["image"]

    def load(reference: str):
        return decode_image(datastore.image(reference), reference)

    assert not torch.allclose(tuned([ref], load)[0][ref], stock([ref], load)[0][ref])

    annotate(label_studio, by_image[images[8]["image"]], "blue")
    second = run_round(project)  # warm-started from the first round's fine-tuned backbone
    assert second["labeled"] == 9 and "finetune" in second
    versions = tmp_path / "projects" / str(project) / "features" / "small-cnn" / "finetuned"
    assert [p.name for p in versions.iterdir()] == [store.load(project).meta["backbone_version"]]  # old one gone
