"""Fuzzing every route with hypothesis: no request, however malformed, gets a 5xx (issue 10, item 6).

Bodies are random JSON, Label Studio's real bodies with fields replaced or removed, raw bytes, deep
nesting, odd content types and odd project ids, sent through the real app (Flask test client, embedded
queue, the real /predict code for bodies that pass validation). Deterministic (``derandomize``) and
bounded: a fixed number of examples per route. The counts are printed and recorded as a test property.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isal_backend.server import create_app
from isal_backend.settings import Settings

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "label-studio-samples"
WEBHOOKS = [f"ml_webhook_{a}" for a in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                                         "PROJECT_UPDATED", "START_TRAINING", "TASKS_CREATED")]
EXAMPLES = {"webhook": 700, "predict": 400, "setup": 300, "versions": 150, "get": 300}


def sample(name: str) -> dict[str, Any]:
    return json.loads((SAMPLES / f"{name}.json").read_text())["request_body"]


ODD = ["３", "³", "1" * 4001, "1.2", "1.1795802474", "-1", "0", "٣", "<View/>", "http://127.0.0.1:9", "\x00", "1\n"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
           | st.sampled_from(ODD))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c,
                                                                                         max_size=4), max_leaves=25)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indexes) into a JSON value."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, names: list[str]) -> Any:
    """A real Label Studio body with a few values replaced by random JSON, or removed."""
    body = copy.deepcopy(sample(draw(st.sampled_from(names))))
    for _ in range(draw(st.integers(0, 3))):  # 0: the real body, which must pass
        paths = [p for p in _paths(body) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(json_values)
    return body


def raw_bodies(names: list[str]) -> st.SearchStrategy[tuple[bytes, str | None]]:
    """(body bytes, content type): mostly JSON, some raw bytes, deep nesting and wrong content types."""
    as_json = (mutated(names) | json_values).map(lambda v: json.dumps(v).encode())
    deep = st.integers(50, 3000).flatmap(lambda n: st.sampled_from([b"[" * n, b"[" * n + b"]" * n,
                                                                     b'{"a":' * n + b"1" + b"}" * n]))
    body = as_json | as_json | as_json | st.binary(max_size=200) | deep
    ctype = st.sampled_from(["application/json"] * 6 + ["text/plain", None, "application/json; charset=utf-8",
                                                       "application/x-www-form-urlencoded", "application/ld+json"])
    return st.tuples(body, ctype)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    # Credentials from the environment pointing at a closed port: /setup never leaves the machine and
    # /predict bodies that pass validation run the real prediction code (no round yet: empty results).
    s = Settings(model_dir=root, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k" * 40,
                 round_job="tests.jobs_for_tests.noop_round", score_job="tests.jobs_for_tests.noop_scoring",
                 reconcile_seconds=0)
    application = create_app(s)
    yield application
    application.config["ISAL_STATE"].close()


FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def test_no_request_gets_a_5xx(app, monkeypatch, tmp_path, record_property) -> None:
    # /predict's model code reads the environment: the same settings as the app's
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k" * 40)
    monkeypatch.setenv("ISAL_BACKBONE", "small-cnn")
    monkeypatch.delenv("REDIS_URL", raising=False)
    client = app.test_client()
    counts: Counter[str] = Counter()
    per_route: dict[str, Counter[str]] = {}

    def check(route: str, response: Any, what: Any) -> None:
        bucket = f"{response.status_code // 100}xx"
        counts["requests"] += 1
        counts[bucket] += 1
        per_route.setdefault(route, Counter())[bucket] += 1
        assert response.status_code < 500, (route, response.status_code, response.data[:300], repr(what)[:300])
        if response.status_code >= 400:
            body = response.get_json(silent=True)
            assert isinstance(body, dict) and body.get("error"), (route, response.data[:200])

    def post_route(route: str, names: list[str], n: int) -> None:
        @settings(FUZZ, max_examples=n)
        @given(raw_bodies(names))
        def run(item: tuple[bytes, str | None]) -> None:
            data, ctype = item
            headers = {"Content-Type": ctype} if ctype else {}
            check(route, client.post(route, data=data, headers=headers), item)

        run()

    started = time.perf_counter()
    post_route("/webhook", WEBHOOKS, EXAMPLES["webhook"])
    post_route("/predict", ["ml_predict"], EXAMPLES["predict"])
    post_route("/setup", ["ml_setup"], EXAMPLES["setup"])
    post_route("/versions", ["ml_setup"], EXAMPLES["versions"])

    @settings(FUZZ, max_examples=EXAMPLES["get"])
    @given(st.sampled_from(["/status/{}", "/is_training?project={}", "/versions?project={}", "/health", "/metrics",
                            "/{}", "/train"]),
           st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30) | st.sampled_from(
               ["３", "³", "1" * 4001, "1", "12.5", "%00", "..%2f..%2fetc"]),
           st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    def run_get(template: str, value: str, method: str) -> None:
        path = template.format(value.replace("?", "").replace("#", ""))  # the test client would unquote %3F
        check(f"{method} {template.split('{')[0].split('?')[0]}", client.open(path, method=method), (method, path))

    run_get()
    seconds = time.perf_counter() - started
    figures = {**counts, "seconds": round(seconds, 1),
               "per_route": {r: dict(c) for r, c in sorted(per_route.items())}}
    print(f"\nfuzz: {json.dumps(figures)}")
    record_property("fuzz", json.dumps(figures))
    assert counts["5xx"] == 0
    assert counts["requests"] >= sum(EXAMPLES.values()) * 0.9 and seconds < 300
