"""The dashboard of a real loop: Label Studio 1.23.2, the backend under gunicorn with basic auth, an RQ worker on
real Redis, and Debian's chromium driven by Playwright.

A Fashion-MNIST project whose every image reference is presigned (``/data/upload/...?X-Amz-Signature=...``,
served by Label Studio itself, which ignores the query) is connected to the backend as a user would
(``POST /api/ml`` with basic auth); "Start training" gives a cold-start round, then annotations made through
the API start rounds through Label Studio's own webhook. The page must then agree with Label Studio (``/next``,
the predictions) and with the rounds' reports, show the worker, render in a browser without an error, and leak
no secret.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from PIL import Image

from isal_backend.bench.datasets import FASHION_MNIST_CLASSES, fashion_mnist_dir, png_bytes, read_idx
from isal_backend.bench.paths import resolve_data_root
from isal_backend.bench.stack import REPO, Service, backend_env, start_backend, start_worker
from isal_backend.history import HistoryReader
from isal_backend.settings import Settings, project_credentials
from isal_backend.store import ModelStore
from tests.dashboard_page import Page, curve_points

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

REDIS_URL = "redis://127.0.0.1:6379/0"
CLASSES = ("trouser", "sneaker", "bag")
PER_CLASS = 14
USER, PASSWORD = "isal", "dash-s3cret:pass"
SIGNATURE = "5ec2e75ig"  # in every image URL's X-Amz-Signature: must never reach a page
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
#: Set to a path (docs/dashboard.png) to keep a copy of the browser's screenshot there.
SCREENSHOT_COPY = "ISAL_DASHBOARD_SCREENSHOT"
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
                + "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>")


def fashion_images() -> list[tuple[str, bytes]]:
    """(class, PNG bytes) of the first PER_CLASS test images of each class."""
    try:
        folder = fashion_mnist_dir(resolve_data_root())
    except FileNotFoundError as exc:  # make test installs it (scripts/ensure-test-services)
        pytest.fail(str(exc), pytrace=False)
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    wanted = {FASHION_MNIST_CLASSES.index(c): c for c in CLASSES}
    out: list[tuple[str, bytes]] = []
    counts = dict.fromkeys(CLASSES, 0)
    for image, label in zip(images, labels, strict=True):
        name = wanted.get(int(label))
        if name is not None and counts[name] < PER_CLASS:
            counts[name] += 1
            out.append((name, png_bytes(image)))
    return out


@dataclass
class Loop:
    """The running stack and the project it ordered."""

    ls: Any
    backend: Service
    worker: Service
    env: dict[str, str]
    tmp: Path
    prefix: str
    project: int
    truth: dict[int, str]
    skipped_tasks: dict[str, int]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}

    @property
    def model_dir(self) -> Path:
        return self.tmp / "models"

    def ls_api(self, method: str, path: str, **kwargs: Any) -> Any:
        r = requests.request(method, f"{self.ls.url}{path}", headers=self.ls.legacy_headers, timeout=60, **kwargs)
        assert r.status_code < 300, f"{method} {path}: HTTP {r.status_code} {r.text[:300]}"
        return r.json() if r.content else None

    def get(self, path: str, auth: bool = True) -> requests.Response:
        return requests.get(f"{self.backend.url}{path}", headers=self.auth if auth else {}, timeout=60)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def wait_for_round(self, done: Any, timeout_s: float = 300) -> dict[str, Any]:
        """Until the project's queue is idle and the current round's report satisfies ``done``."""
        store, deadline = ModelStore(self.model_dir), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            queue = self.get(f"/status/{self.project}").json()["queue"]
            state = store.load(self.project)
            if queue["running"] is None and not any(queue["waiting"].values()) and state and done(state.report):
                return state.report
            time.sleep(1)
        raise AssertionError(f"no round as expected within {timeout_s} s; logs:\n{self.logs()}")

    def annotate(self, task: int, label: str | None, cancelled: bool = False) -> None:
        result = [] if label is None else [{"from_name": "label", "to_name": "image", "type": "choices",
                                            "value": {"choices": [label]}}]
        self.ls_api("POST", f"/api/tasks/{task}/annotations", json={"result": result, "was_cancelled": cancelled})

    @property
    def ls_base(self) -> str:
        """Label Studio as it named itself to /setup (``http://localhost:<port>``), which the links use."""
        url = project_credentials(Settings(model_dir=self.model_dir), self.project).url
        assert url.rsplit(":", 1)[1] == self.ls.url.rsplit(":", 1)[1]  # the same server
        return url.rstrip("/")

    @property
    def secrets(self) -> list[str]:
        return [self.ls.token, PASSWORD, SIGNATURE]


@pytest.fixture(scope="module")
def loop(label_studio: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    tmp = tmp_path_factory.mktemp("dashboard-e2e")
    prefix = f"isal-dash-{uuid.uuid4().hex[:8]}"
    env = backend_env(tmp / "models", REDIS_URL, {
        # No LABEL_STUDIO_URL/_API_KEY: /setup's verified credentials, as a connected project has
        "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "ISAL_BACKBONE": "small-cnn",
        "ISAL_FEATURE_DIM": "16", "ISAL_REDIS_PREFIX": prefix, "RQ_QUEUE": prefix, "ISAL_RECONCILE_SECONDS": "0",
        "ISAL_RETRY_BACKOFF": "2,5,10"})
    backend = start_backend(env, tmp / "backend.log", threads=8)
    worker = start_worker(env, tmp / "worker.log")
    ls = label_studio
    loop = Loop(ls, backend, worker, env, tmp, prefix, 0, {}, {})
    try:
        yield build(loop)
    finally:
        worker.stop()
        backend.stop()
        r = redis.Redis.from_url(REDIS_URL)
        for key in [*r.scan_iter(f"{prefix}*"), *r.scan_iter(f"rq:*{prefix}*")]:
            r.delete(key)


def build(loop: Loop) -> Loop:
    """The project, connected, through a cold start and two batches of annotations."""
    ls = loop.ls
    # The images live in another project's uploads; this project's tasks point at them with presigned-style URLs.
    storage = loop.ls_api("POST", "/api/projects", json={"title": "dashboard images", "label_config": LABEL_CONFIG})
    images = fashion_images()
    files = [(f"file{i}", (f"{name}-{i}.png", data, "image/png")) for i, (name, data) in enumerate(images)]
    loop.ls_api("POST", f"/api/projects/{storage['id']}/import", files=files)
    uploaded = loop.ls_api("GET", "/api/tasks", params={"project": storage["id"], "page_size": 1000})["tasks"]
    by_name = {t["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[1]: t["data"]["image"] for t in uploaded}

    def signed(path: str, i: int) -> str:
        return (f"{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261201"
                f"&X-Amz-Signature={SIGNATURE}{i:04d}")

    tasks = [{"image": signed(by_name[f"{name}-{i}.png"], i), "truth": name} for i, (name, _) in enumerate(images)]
    tasks.append({"image": signed(f"/data/upload/{storage['id']}/missing.png", 9999), "truth": "missing"})
    project = loop.ls_api("POST", "/api/projects", json={"title": "dashboard", "label_config": LABEL_CONFIG})["id"]
    loop.ls_api("POST", f"/api/projects/{project}/import", json=tasks)
    listed = loop.ls_api("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]
    loop.project, loop.truth = project, {t["id"]: t["data"]["truth"] for t in listed}

    r = requests.post(f"{ls.url}/api/ml", json={"url": loop.backend.url, "project": project, "title": "isal",
                                                "auth_method": "BASIC_AUTH", "basic_auth_user": USER,
                                                "basic_auth_pass": PASSWORD}, headers=ls.legacy_headers, timeout=60)
    assert r.status_code == 201, r.text[:500]
    ml = r.json()["id"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # the backend gives Label Studio's webhook its Authorization header
        hooks = loop.ls_api("GET", "/api/webhooks", params={"project": project})
        if hooks and all(h["headers"].get("Authorization") for h in hooks):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the webhook never got basic auth; logs:\n{loop.logs()}")

    loop.ls_api("POST", f"/api/ml/{ml}/train", json={})  # "Start training": no label yet, a cold start
    cold = loop.wait_for_round(lambda rep: rep.get("labeled") == 0)
    assert cold["order"].startswith("cold-start")

    per_class = {c: [t for t, truth in loop.truth.items() if truth == c] for c in CLASSES}
    batches = [[t for c in CLASSES for t in per_class[c][k * 3:(k + 1) * 3]] for k in range(2)]
    loop.skipped_tasks = {"cancelled": per_class["bag"][-1], "off-config": per_class["trouser"][-1],
                          "missing": next(t for t, truth in loop.truth.items() if truth == "missing")}
    for task in batches[0]:
        loop.annotate(task, loop.truth[task])
    loop.annotate(loop.skipped_tasks["cancelled"], None, cancelled=True)  # the annotator skipped it
    loop.annotate(loop.skipped_tasks["off-config"], "shirt")  # a class the config lacks
    loop.wait_for_round(lambda rep: rep.get("labeled") == 9)
    for task in batches[1]:
        loop.annotate(task, loop.truth[task])
    report = loop.wait_for_round(lambda rep: rep.get("labeled") == 18)
    assert report["order"].startswith("isal:"), report["order"]
    return loop


def test_the_page_agrees_with_label_studio_and_the_round_reports(loop: Loop) -> None:
    pid, store = loop.project, ModelStore(loop.model_dir)
    assert loop.get("/dashboard", auth=False).status_code == 401
    assert loop.get(f"/dashboard/{pid}", auth=False).status_code == 401
    overview = loop.get("/dashboard")
    assert overview.status_code == 200
    assert [row.attrs["data-project"] for row in Page(overview.text).rows["project"]] == [str(pid)]

    r = loop.get(f"/dashboard/{pid}")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    page = Page(r.text)
    current = store.load(pid).report

    # One point per round with a model, one timeline row per round: every round the queue ran (its counter in
    # Redis), though the store keeps only the newest five; each stored round's figure is its point's.
    history = HistoryReader().read(store.project_dir(pid))
    succeeded = int(redis.Redis.from_url(REDIS_URL).hget(f"{loop.prefix}:project:{pid}", "n_succeeded_round"))
    assert len(history) == succeeded >= 3, (len(history), succeeded)
    assert [row.attrs["data-round"] for row in page.rows["round"]] == [e["round_id"] for e in reversed(history)]
    with_model = [e["round_id"] for e in history if e.get("validation_accuracy") is not None]
    assert [row.attrs["data-round"] for row in page.rows["point"]] == with_model[::-1] and len(with_model) >= 2
    points = {row.attrs["data-round"]: row.cells[2] for row in page.rows["point"]}
    for round_id in store.rounds(pid):
        stored = store.load(pid, round_id).report
        if stored.get("validation_accuracy") is not None:
            assert points[round_id] == f"{100 * stored['validation_accuracy']:.1f}%"
        else:
            assert round_id not in points and stored["order"].startswith("cold-start")
    assert curve_points(loop.get(f"/dashboard/{pid}/curve.svg").content) == len(with_model)

    # The next tasks: the stream's first tasks as Label Studio serves them.
    shown = [int(item.attrs["data-task"]) for item in page.stream]
    predictions = [p for p in loop.ls_api("GET", "/api/predictions", params={"project": pid})
                   if p["model_version"] == current["model_version"]]
    by_score = [p["task"] for p in sorted(predictions, key=lambda p: p["score"])]
    assert len(shown) == 12 and shown == by_score[:12] == [h["task"] for h in current["stream_head"]]
    assert loop.ls_api("GET", f"/api/projects/{pid}/next")["id"] == shown[0]
    labels = {p["task"]: p["result"][0]["value"]["choices"][0] for p in predictions}
    for item in page.stream:
        task = int(item.attrs["data-task"])
        assert f"pre-label: {labels[task]}" in item.text and "influence" in item.text
    links = [href for href in page.links if "/projects/" in href and "task=" in href]
    assert {f"{loop.ls_base}/projects/{pid}/data?task={t}" for t in shown} <= set(links)
    thumbs = [img["src"] for img in page.images if "/thumbnails/" in img["src"]]
    assert len(thumbs) == 12
    for src in thumbs:
        image = loop.get(src)
        assert image.status_code == 200 and image.headers["Content-Type"] == "image/jpeg"
        assert Image.open(io.BytesIO(image.content)).size == (28, 28)  # never enlarged

    # Skipped and failed: the round report's list, with its reasons.
    skipped = {int(row.attrs["data-task"]): row.cells[1] for row in page.rows["skipped"]}
    assert skipped == {s["task"]: s["reason"] for s in current["skipped"]}
    assert set(skipped) == set(loop.skipped_tasks.values())
    assert "cancelled" in skipped[loop.skipped_tasks["cancelled"]]
    assert "not in the label config" in skipped[loop.skipped_tasks["off-config"]]
    assert "could not be loaded" in skipped[loop.skipped_tasks["missing"]]

    # The worker the queue has, by the name RQ knows it under.
    from rq import Queue, Worker

    names = [w.name for w in Worker.all(queue=Queue(loop.prefix, connection=redis.Redis.from_url(REDIS_URL)))]
    assert names and [row.cells[0] for row in page.rows["worker"]] == sorted(names)

    for body in [overview.text, r.text] + [loop.get(f"/dashboard/{pid}/{name}.svg").text
                                           for name in ("curve", "timeline", "classes")]:
        for secret in loop.secrets:
            assert secret not in body


def test_status_in_a_terminal_reads_the_same_rounds_and_queue(loop: Loop) -> None:
    env = {**loop.env, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "isal_backend", "status", str(loop.project), "--json"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    current = ModelStore(loop.model_dir).load(loop.project).report
    assert data["round"]["model_version"] == current["model_version"]
    assert [h["task"] for h in data["stream"]["head"]] == [h["task"] for h in current["stream_head"]]
    assert data["label_studio"]["project_url"] == f"{loop.ls_base}/projects/{loop.project}/data"
    assert data["queue"]["events"]["round"] >= 1 and data["queue"]["running"] is None
    assert data["workers"] and all(w["state"] in ("idle", "busy") for w in data["workers"])
    table = subprocess.run([sys.executable, "-m", "isal_backend", "status"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert table.returncode == 0 and table.stdout.splitlines()[2].split()[:3] == [str(loop.project),
                                                                               "classification", "isal"]
    for text in (out.stdout, table.stdout):
        for secret in loop.secrets:
            assert secret not in text


def test_the_page_in_a_real_browser(loop: Loop, tmp_path: Path) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    url = f"{loop.backend.url}/dashboard/{loop.project}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                          viewport={"width": 1280, "height": 900})
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            response = page.goto(url, wait_until="networkidle")
            assert response is not None and response.status == 200
            plots = page.locator("img.plot")
            thumbs = page.locator("img.thumb")
            assert plots.count() == 3 and thumbs.count() == 12
            for images in (plots, thumbs):
                for i in range(images.count()):
                    image = images.nth(i)
                    image.scroll_into_view_if_needed()
                    assert image.is_visible()
                    assert image.evaluate("img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0")
            assert page.locator("tr.point").count() >= 2 and page.locator("#stream li").count() == 12
            assert page.evaluate("document.scripts.length") == 0  # nothing to run: readable without JavaScript
            html = page.content()
            for secret in loop.secrets:
                assert secret not in html
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert Image.open(shot).size[0] == 1280
            if os.environ.get(SCREENSHOT_COPY):
                shutil.copyfile(shot, os.environ[SCREENSHOT_COPY])
            overview = context.new_page()
            assert overview.goto(f"{loop.backend.url}/dashboard", wait_until="networkidle").status == 200
            overview.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
            assert errors == []

            # Without credentials the page is refused: the browser gets the 401 challenge and, headless with nothing
            # to answer it, gives up on the navigation; with wrong ones it shows the 401 answer.
            for credentials in (None, {"username": USER, "password": "wrong"}):
                stranger = browser.new_context(http_credentials=credentials) if credentials else browser.new_context()
                tab = stranger.new_page()
                try:
                    answer = tab.goto(url)
                except PlaywrightError as exc:
                    assert credentials is None and "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
                else:
                    assert answer is not None and answer.status == 401 and "Project" not in tab.content()
                refused = stranger.request.get(url)
                assert refused.status == 401 and refused.headers["www-authenticate"].startswith("Basic")
                assert "Project" not in refused.text()
        finally:
            browser.close()
