"""A round against a real Label Studio with bad tasks in it: each is skipped and reported, nothing crashes."""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from isal_backend.jobs.round import Round
from isal_backend.labelstudio.client import LabelStudioUnavailable
from isal_backend.settings import Settings
from isal_backend.store import ModelStore

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


def test_bad_tasks_are_skipped_and_reported(label_studio: Any, tmp_path: Path) -> None:
    headers = label_studio.legacy_headers
    api = label_studio.url + "/api"
    project = requests.post(f"{api}/projects", json={"title": "faults", "label_config": CONFIG}, headers=headers,
                            timeout=60).json()["id"]
    good = [{"image": data_url((200, 30, 30) if i % 2 else (30, 30, 200), i)} for i in range(16)]
    corrupt = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    bad = [{"image": "http://127.0.0.1:9/unreachable.png"}, {"image": corrupt}, {"image": ""}]
    r = requests.post(f"{api}/projects/{project}/import", json=good + bad, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    tasks = requests.get(f"{api}/tasks", params={"project": project, "page_size": 100}, headers=headers,
                         timeout=60).json()["tasks"]
    by_image = {t["data"].get("image"): t["id"] for t in tasks}
    for i in range(8):
        task = by_image[good[i]["image"]]
        requests.post(f"{api}/tasks/{task}/annotations", json={"result": choice("red" if i % 2 else "blue")},
                      headers=headers, timeout=60).raise_for_status()
    off_config = by_image[good[8]["image"]]
    requests.post(f"{api}/tasks/{off_config}/annotations", json={"result": choice("green")}, headers=headers,
                  timeout=60).raise_for_status()

    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
                        model_dir=tmp_path, backbone="small-cnn", write_top_m=0)
    report = Round(project, settings).run()

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
        Round(5, settings).run()
    assert "127.0.0.1:9" in str(info.value) and secret not in str(info.value)
    assert ModelStore(tmp_path).current_id(5) is None
