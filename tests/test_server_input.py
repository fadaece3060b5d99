"""Hostile and malformed requests: every one gets a 4xx whose message names the problem (issue 10, items 1, 6, 9).

Each case here was a 500 (or was accepted) before: RecursionError on deep JSON, ``"³"`` and 4,001-digit
project ids, an invalid label config or a bad task in /predict, text/plain bodies taken as JSON, no body
size limit, and the scheme ``basic`` in lower case refused.
"""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from isal_backend.server import create_app
from isal_backend.settings import Settings

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "label-studio-samples"
JSON_ROUTES = ("/setup", "/predict", "/webhook", "/versions")


def sample(name: str) -> dict:
    return json.loads((SAMPLES / f"{name}.json").read_text())["request_body"]


def make(tmp_path: Path, **kw):
    kw.setdefault("label_studio_url", "http://127.0.0.1:9")  # a closed port: nothing here reaches a server
    kw.setdefault("label_studio_api_key", "k" * 40)
    settings = Settings(model_dir=tmp_path, round_job="tests.jobs_for_tests.noop_round",
                        score_job="tests.jobs_for_tests.noop_scoring", reconcile_seconds=0, **kw)
    return create_app(settings), settings


@pytest.fixture
def client(tmp_path):
    app, _ = make(tmp_path)
    yield app.test_client()
    app.config["ISAL_STATE"].close()


def _error(r) -> str:
    body = r.get_json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), r.data[:300]
    return body["error"]


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_json_routes_refuse_other_content_types(client, route):
    """``get_json(force=True)`` took text/plain: a CSRF-able form post could reach /setup."""
    payload = json.dumps(sample("ml_setup")).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = client.post(route, data=payload, headers=headers)
        assert r.status_code == 415, (route, content_type, r.status_code)
        assert "Content-Type: application/json" in _error(r)
    r = client.post(route, data=payload, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code != 415


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("raw", [b"[" * 2000, b"[" * 2000 + b"]" * 2000, b'{"a":' * 3000 + b"1" + b"}" * 3000],
                         ids=["open", "closed", "objects"])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(client, route, raw):
    r = client.post(route, data=raw, content_type="application/json")
    assert r.status_code == 400, (route, r.status_code, r.data[:200])
    assert "nested deeper than" in _error(r)


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_bodies_that_are_not_json_name_the_problem(client, route):
    for raw, needle in ((b"{bad", "not valid JSON"), (b"\xff\xfe\x00", "not valid JSON"),
                        (b"1" * 5000, "not valid JSON")):
        r = client.post(route, data=raw, content_type="application/json")
        assert r.status_code == 400 and needle in _error(r), (route, raw[:10])


BAD_PROJECT_IDS = ["３", "³", "1" * 4001, "٣", "1.2.3", "-1", "0", " 1", "1\n", "", "1e3", 0, -5, 2**63, True, None,
                   [1], {"id": 1}, 1.5]


@pytest.mark.parametrize("project", BAD_PROJECT_IDS, ids=[repr(p)[:12] for p in BAD_PROJECT_IDS])
def test_project_ids_are_ascii_digits_of_bounded_length(client, tmp_path, project):
    """Fullwidth "３" overwrote project 3's credentials; "³" and 4,001 digits were 500s."""
    for route, body in (("/setup", sample("ml_setup")), ("/predict", sample("ml_predict"))):
        r = client.post(route, json={**body, "project": project})
        assert r.status_code == 400 and "'project' must be a project id" in _error(r), (route, project)
    if project is not None:  # /versions without a project lists every project's versions
        r = client.post("/versions", json={"project": project})
        assert r.status_code == 400, project
    if isinstance(project, str) and project and "\n" not in project:
        for path in (f"/status/{project}", f"/is_training?project={project}", f"/versions?project={project}"):
            r = client.get(path)
            assert r.status_code in (400, 404), (path, r.status_code)
            assert r.status_code == 404 or "'project' must be a project id" in _error(r)
    assert not (tmp_path / "projects" / "3").exists()


def test_webhook_ids_are_bounded(client):
    body = sample("ml_webhook_ANNOTATION_CREATED")
    for bad in (10**4000, 2**63, -(10**30)):
        r = client.post("/webhook", data=json.dumps({**body, "project": {**body["project"], "id": bad}}),
                        content_type="application/json")
        assert r.status_code == 400 and "positive integer below 2**63" in _error(r)
        assert len(_error(r)) < 400  # the message does not echo 4,000 digits


def test_status_of_a_project_needs_an_ascii_id(client):
    assert client.get("/status/12").status_code == 200
    r = client.get("/status/" + "9" * 4001)
    assert r.status_code == 400 and "an integer of" not in _error(r)


def _predict(task_edit=None, **fields):
    body = json.loads(json.dumps(sample("ml_predict")))
    if task_edit is not None:
        task_edit(body["tasks"][0])
    body.update(fields)
    return body


@pytest.mark.parametrize(("body", "needle"), [
    (_predict(lambda t: t.pop("id")), "tasks[0].id must be a positive integer"),
    (_predict(lambda t: t.update(id="1534")), "tasks[0].id must be a positive integer"),
    (_predict(lambda t: t.update(id=True)), "tasks[0].id must be a positive integer"),
    (_predict(lambda t: t.update(data="http://x/img.png")), "tasks[0].data must be a JSON object, got str"),
    (_predict(lambda t: t.update(data=None)), "tasks[0].data must be a JSON object, got NoneType"),
    (_predict(tasks=[1]), "tasks[0] must be a JSON object"),
    (_predict(tasks={"id": 1}), "'tasks' must be a list"),
    (_predict(label_config="<View><Image"), "unsupported label config: label config is not well-formed XML"),
    (_predict(label_config='<View><Text name="t" value="$t"/></View>'), "unsupported label config"),
    (_predict(label_config=""), "unsupported label config: label config is empty"),
    (_predict(label_config=5), "'label_config' must be a string"),
    (_predict(label_config='<!DOCTYPE x [<!ENTITY a "b">]><View/>'), "<!DOCTYPE>"),
])
def test_predict_validates_before_running_the_model(client, body, needle):
    r = client.post("/predict", json=body)
    assert r.status_code == 400, r.get_json()
    assert needle in _error(r)


def test_predict_for_a_project_without_credentials_is_a_400(tmp_path):
    app, _ = make(tmp_path, label_studio_url=None, label_studio_api_key=None)
    r = app.test_client().post("/predict", json=sample("ml_predict"))
    assert r.status_code == 400 and "project 1 has no Label Studio credentials" in _error(r)
    app.config["ISAL_STATE"].close()


def test_predict_runs_with_the_servers_settings_not_the_environments(tmp_path, monkeypatch):
    """The environment here has no credentials and another model store; the server's settings are used."""
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "elsewhere"))
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    app, _ = make(tmp_path)  # the app itself has credentials
    r = app.test_client().post("/predict", json=sample("ml_predict"))
    assert r.status_code == 200, _error(r)
    assert [x["model_version"] for x in r.get_json()["results"]] == ["none"] * len(sample("ml_predict")["tasks"])
    assert not (tmp_path / "elsewhere").exists()
    app.config["ISAL_STATE"].close()


def test_body_size_limit_is_a_413(tmp_path):
    app, _ = make(tmp_path, max_body_mb=1)
    c = app.test_client()
    big = json.dumps({"action": "START_TRAINING", "project": {"id": 1}, "pad": "x" * (2 * 1024 * 1024)})
    for route in JSON_ROUTES:
        r = c.post(route, data=big, content_type="application/json")
        assert r.status_code == 413 and "ISAL_MAX_BODY_MB=1" in _error(r), route
    small = json.dumps({"action": "START_TRAINING", "project": {"id": 1}, "pad": "x" * 1000})
    assert c.post("/webhook", data=small, content_type="application/json").status_code == 201
    app.config["ISAL_STATE"].close()


@pytest.mark.redis  # the Harness pings the shared Redis; the server itself runs in embedded mode
def test_body_size_limit_holds_for_chunked_bodies_under_gunicorn(tmp_path):
    """Without a Content-Length the body is still read only up to the limit."""
    from tests.jobs_for_tests import Harness

    h = Harness(str(tmp_path), ISAL_MAX_BODY_MB="1", ISAL_ROUND_JOB="tests.jobs_for_tests.noop_round")
    del h.env["REDIS_URL"]
    try:
        url = urlsplit(h.start_gunicorn(workers=1, threads=2))
        for size, expected in ((3 * 1024 * 1024, 413), (1000, 201)):
            payload = json.dumps({"action": "START_TRAINING", "project": {"id": 1}, "pad": "x" * size}).encode()
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
            conn.putrequest("POST", "/webhook")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for start in range(0, len(payload), 65536):
                chunk = payload[start:start + 65536]
                try:
                    conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except (BrokenPipeError, ConnectionResetError):
                    break  # the server answered and closed early
            else:
                conn.send(b"0\r\n\r\n")
            response = conn.getresponse()
            assert response.status == expected, (size, response.status, response.read()[:200])
            conn.close()
    finally:
        h.stop()


def _basic(scheme: str, user: str, password: str) -> dict[str, str]:
    return {"Authorization": f"{scheme} " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_scheme_is_case_insensitive(tmp_path):
    app, _ = make(tmp_path, basic_auth_user="ls", basic_auth_pass="pa:ss")
    c = app.test_client()
    for scheme in ("Basic", "basic", "BASIC", "bAsIc"):
        assert c.get("/metrics", headers=_basic(scheme, "ls", "pa:ss")).status_code == 200, scheme
    for headers in (_basic("Bearer", "ls", "pa:ss"), _basic("basic", "ls", "nope"), {"Authorization": "basic"},
                    {"Authorization": "basic ☃"}):
        assert c.get("/metrics", headers=headers).status_code == 401
    app.config["ISAL_STATE"].close()
