"""End to end with basic auth on: Label Studio's own webhook reaches the backend and a round runs (issue 10, item 5).

Label Studio creates the backend's webhook with no headers, so with BASIC_AUTH_USER/PASS set every
event got 401 and no round ever ran. The backend (under gunicorn, embedded queue, real rounds, no
LABEL_STUDIO_URL/KEY: the credentials come from /setup, verified while Label Studio waits for it) gives
the webhook its Authorization header; then an annotation made in Label Studio starts a round.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from isal_backend.bench.stack import backend_env, start_backend
from isal_backend.store import ModelStore
from tests.test_round_faults import CONFIG, choice, data_url

pytestmark = pytest.mark.e2e
USER, PASSWORD = "isal", "s3cret:pass"


def test_with_basic_auth_label_studio_webhooks_start_rounds(label_studio: Any, tmp_path: Path) -> None:
    api, headers = label_studio.url + "/api", label_studio.legacy_headers
    env = backend_env(tmp_path / "models", None, {"BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
                                                  "ISAL_BACKBONE": "small-cnn", "ISAL_WRITE_TOP_M": "0"})
    backend = start_backend(env, tmp_path / "backend.log", threads=8)
    try:
        assert requests.get(f"{backend.url}/metrics", timeout=10).status_code == 401  # auth is on
        project = requests.post(f"{api}/projects", json={"title": "basic auth", "label_config": CONFIG},
                                headers=headers, timeout=60).json()["id"]
        images = [{"image": data_url((200, 30, 30) if i % 2 else (30, 30, 200), 700 + i)} for i in range(12)]
        requests.post(f"{api}/projects/{project}/import", json=images, headers=headers, timeout=60).raise_for_status()
        r = requests.post(f"{api}/ml", json={"url": backend.url, "project": project, "title": "isal",
                                             "auth_method": "BASIC_AUTH", "basic_auth_user": USER,
                                             "basic_auth_pass": PASSWORD}, headers=headers, timeout=60)
        assert r.status_code == 201, r.text[:500]
        # /setup verified Label Studio's token with Label Studio while it waited (it serves requests concurrently)
        assert (tmp_path / "models" / "projects" / str(project) / "credentials.json").exists()

        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        deadline, hooks = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            hooks = requests.get(f"{api}/webhooks", params={"project": project}, headers=headers, timeout=30).json()
            if hooks and all(h["headers"].get("Authorization") == expected for h in hooks):
                break
            time.sleep(0.5)
        assert [h["url"] for h in hooks] == [f"{backend.url}/webhook"], hooks
        assert hooks[0]["headers"].get("Authorization") == expected, "the webhook never got basic auth"

        tasks = requests.get(f"{api}/tasks", params={"project": project}, headers=headers, timeout=60).json()["tasks"]
        for i, task in enumerate(tasks[:6]):
            requests.post(f"{api}/tasks/{task['id']}/annotations", json={"result": choice("red" if i % 2 else "blue")},
                          headers=headers, timeout=60).raise_for_status()
        store, report = ModelStore(tmp_path / "models"), None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = store.load(project)
            if state is not None and state.report.get("labeled") == 6:
                report = state.report
                break
            time.sleep(1)
        log = (tmp_path / "backend.log").read_text(errors="replace")
        assert report is not None, f"no round saw the 6 annotations; backend log:\n{log[-4000:]}"
        assert report["unlabeled"] == 6
        assert label_studio.token not in log and PASSWORD not in log
    finally:
        backend.stop()
