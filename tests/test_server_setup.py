"""/setup stores a project's credentials only once Label Studio accepts them (issue 10, item 1).

Against the real Label Studio 1.23.2 (legacy token and personal access token), plus loopback canaries
for what a real one does not do on demand: a host that accepts any token (someone else's "Label
Studio"), and one that answers only after /setup stopped waiting (a Label Studio serving one request at
a time).
"""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from isal_backend.server import create_app
from isal_backend.settings import Settings, project_credentials, stored_project_credentials

pytestmark = pytest.mark.e2e
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="red"/><Choice value="blue"/></Choices></View>')


class Canary:
    """A loopback HTTP server answering ``GET /api/projects/<id>/`` like Label Studio, after ``delay_s``."""

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        canary = self
        self.requests: list[dict[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                canary.requests.append({"path": self.path, "authorization": self.headers.get("Authorization", "")})
                time.sleep(delay_s)
                pid = self.path.rstrip("/").rsplit("/", 1)[-1]
                answer = {"id": int(pid)} if status == 200 and pid.isdigit() else {"detail": "internal-secret-body"}
                body = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    """The app as it runs without LABEL_STUDIO_URL/KEY: credentials come from /setup."""
    application = create_app(Settings(model_dir=tmp_path, round_job="tests.jobs_for_tests.noop_round",
                                      score_job="tests.jobs_for_tests.noop_scoring", reconcile_seconds=0))
    yield application
    application.config["ISAL_STATE"].close()


def _project(label_studio: Any, title: str) -> int:
    r = requests.post(f"{label_studio.url}/api/projects", json={"title": title, "label_config": CONFIG},
                      headers=label_studio.legacy_headers, timeout=60)
    assert r.status_code == 201, r.text[:300]
    return r.json()["id"]


def _setup(app: Any, project: int | str, hostname: str, token: str) -> Any:
    return app.test_client().post("/setup", json={"project": f"{project}.1795802474", "schema": CONFIG,
                                                  "hostname": hostname, "access_token": token})


def _settings(app: Any) -> Settings:
    return app.config["ISAL_STATE"].settings


@pytest.mark.parametrize("kind", ["legacy token", "personal access token"])
def test_credentials_label_studio_accepts_are_stored_0600(app, label_studio, kind):
    project = _project(label_studio, f"setup {kind}")
    token = label_studio.token if kind == "legacy token" else label_studio.personal_access_token()
    r = _setup(app, project, label_studio.url, token)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["credentials"] == "verified" and token not in r.get_data(as_text=True)
    path = _settings(app).model_dir / "projects" / str(project) / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = project_credentials(_settings(app), project)
    assert (creds.url, creds.api_key) == (label_studio.url, token)
    assert _setup(app, project, label_studio.url, token).get_json()["credentials"] == "stored"  # no second check


def test_a_token_label_studio_refuses_is_a_403_and_replaces_nothing(app, label_studio):
    project = _project(label_studio, "setup refused")
    r = _setup(app, project, label_studio.url, "0" * 40)
    assert r.status_code == 403 and "refused the access token" in r.get_json()["error"]
    assert stored_project_credentials(_settings(app), project) is None
    assert _setup(app, project, label_studio.url, label_studio.token).status_code == 200
    r = _setup(app, project, label_studio.url, "f" * 40)  # someone tries to replace them
    assert r.status_code == 403
    assert stored_project_credentials(_settings(app), project).api_key == label_studio.token


def test_a_project_label_studio_does_not_have_is_refused(app, label_studio):
    r = _setup(app, 987654, label_studio.url, label_studio.token)
    assert r.status_code == 400 and "did not confirm project 987654" in r.get_json()["error"]
    assert stored_project_credentials(_settings(app), 987654) is None


def test_another_host_cannot_take_over_a_connected_project(app, label_studio):
    """A host that accepts anything could pose as Label Studio; the project's own Label Studio must agree."""
    project = _project(label_studio, "setup takeover")
    assert _setup(app, project, label_studio.url, label_studio.token).status_code == 200
    canary = Canary(status=200)
    try:
        r = _setup(app, project, canary.url, "attacker-token")
        assert r.status_code == 403 and f"connected to Label Studio at {label_studio.url}" in r.get_json()["error"]
        assert canary.requests  # it was asked, and said yes; the stored Label Studio said no
    finally:
        canary.close()
    creds = stored_project_credentials(_settings(app), project)
    assert (creds.url, creds.api_key) == (label_studio.url, label_studio.token)


@pytest.mark.parametrize("status", [404, 500])
def test_setup_never_reflects_what_a_host_answered(app, status):
    """/setup is open without basic auth: it must not read internal hosts' answers out to its caller."""
    canary = Canary(status=status)
    try:
        r = _setup(app, 9, canary.url, "t" * 40)
        assert r.status_code == 400 and "internal-secret-body" not in r.get_data(as_text=True)
    finally:
        canary.close()


def test_an_unreachable_host_is_a_400_with_the_fix(app):
    r = _setup(app, 5, "http://127.0.0.1:9", "a" * 40)
    assert r.status_code == 400 and "cannot reach Label Studio at http://127.0.0.1:9" in r.get_json()["error"]
    assert "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in r.get_json()["error"]
    assert stored_project_credentials(_settings(app), 5) is None


@pytest.mark.parametrize(("status", "stored"), [(200, True), (401, False)])
def test_a_label_studio_that_answers_after_setup_returned_is_verified_in_the_background(app, status, stored):
    """A single-threaded Label Studio can only answer once /setup returned: /setup answers within Label
    Studio's 3 s, then the verification finishes; nothing is stored unless it accepts."""
    canary = Canary(status=status, delay_s=3.5)
    try:
        started = time.monotonic()
        r = _setup(app, 8, canary.url, "slow-token")
        assert time.monotonic() - started < 3.0
        assert r.status_code == 200 and r.get_json()["credentials"] == "verifying", r.get_json()
        assert stored_project_credentials(_settings(app), 8) is None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and stored_project_credentials(_settings(app), 8) is None:
            time.sleep(0.2)
        time.sleep(0.5)
        assert (stored_project_credentials(_settings(app), 8) is not None) is stored
        assert canary.requests[0]["authorization"] == "Token slow-token"
    finally:
        canary.close()


def _wait_idle(app: Any, timeout_s: float = 10.0) -> None:
    coalescer = app.config["ISAL_STATE"].coalescer
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not coalescer.idle():
        time.sleep(0.05)
    assert coalescer.idle()


def test_setup_starts_the_cold_start_round_only_while_the_project_has_none(tmp_path):
    """Issue 9: connecting orders the stream before any annotation, without a round on every /setup call."""
    application = create_app(Settings(model_dir=tmp_path, label_studio_url="http://127.0.0.1:9",
                                      label_studio_api_key="k" * 40, round_job="tests.jobs_for_tests.slow_noop_round",
                                      score_job="tests.jobs_for_tests.noop_scoring", reconcile_seconds=0))
    try:
        client = application.test_client()

        def setup() -> dict[str, Any]:
            r = client.post("/setup", json={"project": "3.1795802474", "schema": CONFIG})
            assert r.status_code == 200, r.get_json()
            return r.get_json()

        first = setup()
        assert first["credentials"] == "environment" and first["round"]["state"] == "enqueued"
        assert first["round"]["job_id"].startswith("round-3-")
        assert "round" not in setup()  # the round runs or waits: Label Studio's next /setup adds none
        _wait_idle(application)
        (tmp_path / "projects" / "3" / "CURRENT").write_text("isal-20260101T000000000000-abcdef\n")
        assert "round" not in setup()  # a model exists
        (tmp_path / "projects" / "3" / "CURRENT").unlink()
        assert setup()["round"]["state"] == "enqueued"  # no model and none under way: again
        _wait_idle(application)
    finally:
        application.config["ISAL_STATE"].close()
