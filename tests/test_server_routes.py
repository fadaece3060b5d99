"""/health, /setup, /predict, /versions, /metrics, /status, basic auth, and that no secret is ever served."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from isal_backend.server import create_app
from isal_backend.settings import Settings, project_credentials
from isal_backend.status import record_round

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "label-studio-samples"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # /setup's access_token in the sample
PROJECT_TOKEN = "TxOpq4EfFL8MUjnDFzd5bWUNmwuD8rzYXxm3TrRf"  # every webhook's project.token


def body(name: str) -> dict:
    return json.loads((SAMPLES / f"{name}.json").read_text())["request_body"]


def make(tmp_path, **kw):
    settings = Settings(model_dir=tmp_path, round_job="tests.jobs_for_tests.noop_round",
                        score_job="tests.jobs_for_tests.noop_scoring", **kw)
    app = create_app(settings)
    return app, settings


@pytest.fixture
def app_settings(tmp_path):
    app, settings = make(tmp_path)
    yield app, settings
    app.config["ISAL_STATE"].coalescer.close()


def test_health(app_settings):
    app, _ = app_settings
    r = app.test_client().get("/health")
    assert r.status_code == 200 and r.get_json()["status"] == "UP"


def test_setup_does_not_store_a_token_when_one_is_configured(tmp_path):
    app, settings = make(tmp_path, label_studio_url="http://ls:8080", label_studio_api_key="env-key")
    for hostname in ("http://localhost:8080", "http://attacker.example:9"):
        r = app.test_client().post("/setup", json={**body("ml_setup"), "hostname": hostname})
        assert r.status_code == 200 and r.get_json()["credentials"] == "environment"
    assert not (settings.model_dir / "projects" / "1" / "credentials.json").exists()
    creds = project_credentials(settings, 1)
    assert (creds.url, creds.api_key) == ("http://ls:8080", "env-key")  # the request's hostname is never used
    app.config["ISAL_STATE"].close()


@pytest.mark.parametrize(
    ("payload", "needle"),
    [({"schema": "<View/>"}, "'project'"), ({"project": "1.2"}, "'schema'"), ({"project": "x", "schema": "<View/>"},
                                                                               "'project'")],
)
def test_setup_bad_bodies(app_settings, payload, needle):
    r = app_settings[0].test_client().post("/setup", json=payload)
    assert r.status_code == 400 and needle in r.get_json()["error"]


def test_setup_rejects_an_unsupported_label_config(app_settings):
    payload = {**body("ml_setup"), "schema": '<View><Text name="t" value="$text"/></View>'}
    r = app_settings[0].test_client().post("/setup", json=payload)
    assert r.status_code == 400 and "unsupported label config" in r.get_json()["error"]


def test_predict_validates_and_reports_a_missing_backend(app_settings):
    c = app_settings[0].test_client()
    r = c.post("/predict", json={"tasks": "nope", "project": "1.2"})
    assert r.status_code == 400 and "'tasks'" in r.get_json()["error"]
    r = c.post("/predict", json={"tasks": [], "project": "1.2"})
    assert r.status_code == 400 and "label_config" in r.get_json()["error"]



def test_predict_before_any_round_answers_one_neutral_result_per_task(tmp_path):
    app, _ = make(tmp_path, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k")
    r = app.test_client().post("/predict", json=body("ml_predict"))  # no Label Studio call is needed for that
    sent = body("ml_predict")["tasks"]
    assert r.status_code == 200 and r.get_json()["results"] == [
        {"result": [], "score": 0.5, "model_version": "none"} for _ in sent]
    app.config["ISAL_STATE"].close()


def test_versions_get_and_post_and_metrics_show_the_last_round(tmp_path):
    app, settings = make(tmp_path, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k")
    c = app.test_client()
    assert c.get("/versions").get_json()["versions"] == []
    record_round(3, {"model_version": "round-3-abc", "tasks_scored": 1000,
                     "timings": {"train_s": 2.5, "score_s": 1.25}}, settings=settings)
    assert c.get("/versions?project=3").get_json()["versions"] == ["round-3-abc"]
    assert c.post("/versions", json={"project": "3.17"}).get_json()["versions"] == ["round-3-abc"]
    assert c.post("/versions", json={"project": "4.17"}).get_json()["versions"] == []
    text = c.get("/metrics").data.decode()
    assert 'isal_last_round_tasks_scored{project="3"} 1000.0' in text
    assert 'isal_last_round_seconds{phase="train_s",project="3"} 2.5' in text
    assert c.get("/metrics").headers["Content-Type"].startswith("text/plain")
    assert c.post("/setup", json={**body("ml_setup"), "project": "3.1"}).get_json()["model_version"] == "round-3-abc"
    app.config["ISAL_STATE"].close()


def _auth(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_on_every_route_but_health(tmp_path):
    app, _ = make(tmp_path, basic_auth_user="ls", basic_auth_pass="pa:ss")
    c = app.test_client()
    assert c.get("/health").status_code == 200
    routes = [("post", "/webhook", body("ml_webhook_START_TRAINING")), ("post", "/setup", body("ml_setup")),
              ("post", "/predict", body("ml_predict")), ("get", "/versions", None), ("get", "/metrics", None),
              ("get", "/status/1", None), ("get", "/is_training?project=1", None)]
    for method, path, payload in routes:
        for headers in ({}, _auth("ls", "wrong"), _auth("other", "pa:ss"), {"Authorization": "Basic !!!"}):
            r = getattr(c, method)(path, json=payload, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.headers["WWW-Authenticate"].startswith("Basic") and "error" in r.get_json()
    assert c.post("/webhook", json=body("ml_webhook_START_TRAINING"), headers=_auth("ls", "pa:ss")).status_code == 201
    assert c.get("/metrics", headers=_auth("ls", "pa:ss")).status_code == 200
    app.config["ISAL_STATE"].coalescer.close()


def test_no_secret_in_any_answer_or_log(tmp_path, caplog):
    secrets = ["env-api-key-XYZ", "basic-pass-XYZ", TOKEN, PROJECT_TOKEN]
    app, settings = make(tmp_path, label_studio_url="http://127.0.0.1:9", label_studio_api_key="env-api-key-XYZ",
                         basic_auth_user="u", basic_auth_pass="basic-pass-XYZ")
    c = app.test_client()
    headers = _auth("u", "basic-pass-XYZ")
    caplog.set_level(logging.DEBUG)
    logging.getLogger().setLevel(logging.DEBUG)
    c.post("/setup", json=body("ml_setup"), headers=headers)
    for name in ("ANNOTATION_CREATED", "TASKS_CREATED", "PROJECT_UPDATED"):
        c.post("/webhook", json=body(f"ml_webhook_{name}"), headers=headers)
    c.post("/webhook", data=b"{bad", headers=headers)
    answers = [c.get(p, headers=headers).data.decode() for p in ("/metrics", "/health", "/versions", "/status/1")]
    answers.append(repr(settings))
    for text in answers + [caplog.text]:
        for secret in secrets:
            assert secret not in text
    assert "isal_webhook_requests_total" in answers[0]
    app.config["ISAL_STATE"].coalescer.close()
