"""LabelStudioClient against a real Label Studio 1.23.2 (the session fixture in conftest.py)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from isal_backend.labelstudio import build_predictions, decode_image, parse_label_config, task_label
from isal_backend.labelstudio.client import (
    DownloadError,
    LabelStudioAPIError,
    LabelStudioClient,
    LabelStudioError,
    PredictionsDropped,
)
from isal_backend.labelstudio.convert import AnnotationSkipped
from isal_backend.labelstudio.fetch import DownloadPolicy
from tests.loopback_http import serve

pytestmark = pytest.mark.e2e

LABEL_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
                '<Choice value="cat"/><Choice value="dog"/></Choices></View>')
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def _data_url(color: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(color)).decode()


def _choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


class Api:
    """Test-side setup calls, straight to the LS REST API with the legacy token."""

    def __init__(self, server: Any) -> None:
        self.url = server.url
        self.s = requests.Session()
        self.s.headers.update(server.legacy_headers)

    def __call__(self, method: str, path: str, expect: int = 200, **kw: Any) -> Any:
        r = self.s.request(method, f"{self.url}{path}", timeout=300, **kw)
        assert r.status_code == expect, f"{method} {path}: HTTP {r.status_code} {r.text[:300]}"
        return r.json() if r.content else None

    def project(self, title: str) -> int:
        return self("POST", "/api/projects", 201, json={"title": title, "label_config": LABEL_CONFIG})["id"]

    def task_ids(self, project: int) -> list[int]:
        body = self("GET", "/api/tasks", params={"project": project, "page_size": 10000, "include": "id"})
        return sorted(t["id"] for t in body["tasks"])

    def annotate(self, task: int, label: str | None, cancelled: bool = False) -> dict:
        return self("POST", f"/api/tasks/{task}/annotations", 201,
                    json={"result": [] if label is None else _choice(label), "was_cancelled": cancelled})


@pytest.fixture(scope="module")
def api(label_studio: Any) -> Api:
    return Api(label_studio)


@pytest.fixture(scope="module", params=["legacy", "pat"])
def client(request: pytest.FixtureRequest, label_studio: Any) -> Iterator[LabelStudioClient]:
    key = label_studio.token if request.param == "legacy" else label_studio.personal_access_token()
    with LabelStudioClient(label_studio.url, key, timeout=60, retries=2, backoff=0.2) as c:
        yield c


@pytest.fixture(scope="module")
def images_project(api: Api, label_studio: Any) -> dict[str, Any]:
    """A project whose tasks reference images in every way LS allows, each image a known colour."""
    pid = api.project("images")
    expected: dict[str, tuple[int, int, int]] = {}
    # data URLs
    api("POST", f"/api/projects/{pid}/import", 201, json=[{"image": _data_url(COLORS[0])}])
    expected[_data_url(COLORS[0])] = COLORS[0]
    # uploads: LS keeps only one file per multipart field name, so each file gets its own field
    files = {f"file{i}": (f"up{i}.png", _png(COLORS[1 + i]), "image/png") for i in range(2)}
    api("POST", f"/api/projects/{pid}/import", 201, files=files)
    # local-files storage
    (label_studio.files_root / "imgs").mkdir(exist_ok=True)
    (label_studio.files_root / "imgs" / "local.png").write_bytes(_png(COLORS[3]))
    storage = api("POST", "/api/storages/localfiles", 201,
                  json={"project": pid, "path": str(label_studio.files_root / "imgs"), "use_blob_urls": True,
                        "regex_filter": r".*\.png", "title": "local"})
    api("POST", f"/api/storages/localfiles/{storage['id']}/sync")
    deadline = time.monotonic() + 60
    while len(api.task_ids(pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    tasks = api("GET", "/api/tasks", params={"project": pid, "page_size": 100})["tasks"]
    refs = [t["data"]["image"] for t in tasks]
    uploads = [r for r in refs if r.startswith("/data/upload/")]
    assert len(uploads) == 2, refs
    for ref in uploads:
        expected[ref] = COLORS[1] if "up0.png" in ref else COLORS[2]
    local = [r for r in refs if r.startswith("/data/local-files/")]
    assert local == ["/data/local-files/?d=imgs/local.png"], refs
    expected[local[0]] = COLORS[3]
    # an absolute URL of this LS
    absolute = label_studio.url + uploads[0]
    api("POST", f"/api/projects/{pid}/import", 201, json=[{"image": absolute}])
    expected[absolute] = expected[uploads[0]]
    return {"id": pid, "expected": expected}


def test_get_project(client: LabelStudioClient, images_project: dict) -> None:
    project = client.get_project(images_project["id"])
    assert project["title"] == "images"
    config = parse_label_config(project["label_config"])
    assert (config.image_value_key, config.labels) == ("image", ["cat", "dog"])


def test_download_every_kind_of_reference(client: LabelStudioClient, images_project: dict) -> None:
    kinds = {ref.split(":", 1)[0] if ":" in ref[:6] else ref.split("/")[2] for ref in images_project["expected"]}
    assert kinds == {"data", "upload", "local-files", "http"}
    tasks = client.list_tasks(images_project["id"])
    assert sorted(t["data"]["image"] for t in tasks) == sorted(images_project["expected"])
    for ref, color in images_project["expected"].items():
        image = decode_image(client.download(ref), ref)
        assert image.getpixel((3, 3)) == color, ref


def test_download_errors(client: LabelStudioClient, label_studio: Any) -> None:
    with pytest.raises(LabelStudioAPIError) as err:
        client.download("/data/local-files/?d=imgs/missing.png")
    assert err.value.status_code == 404
    assert label_studio.token not in str(err.value)


@pytest.mark.parametrize("kind", ["legacy", "pat"])
def test_third_party_urls_never_get_the_key(label_studio: Any, kind: str) -> None:
    """A third-party image host (a different origin: localhost, not 127.0.0.1) must not see LS credentials.

    It is on loopback, so SSRF protection refuses it until the user allowlists it (ISAL_IMAGE_HOSTS_ALLOWED)."""
    key = label_studio.token if kind == "legacy" else label_studio.personal_access_token()
    with serve() as server:
        url = server.url("/img.png?sig=abc", host="localhost")
        with LabelStudioClient(label_studio.url, key, retries=0) as guarded, \
                pytest.raises(DownloadError, match="refused: host localhost resolves to 127.0.0.1, a loopback"):
            guarded.download(url)
        assert server.requests == []
        with LabelStudioClient(label_studio.url, key, retries=0,
                               download_policy=DownloadPolicy(allowed=("localhost",))) as client:
            assert decode_image(client.download(url), url).getpixel((0, 0)) == (10, 200, 30)  # loopback_http.png()
            with pytest.raises(DownloadError, match="HTTP 404"):
                client.download(server.url("/missing.png", host="localhost"))
        assert len(server.requests) == 2
        for request in server.requests:
            assert not {k.lower() for k in request["headers"]} & {"authorization", "cookie", "x-api-key"}


def test_list_tasks_with_annotations(client: LabelStudioClient, api: Api) -> None:
    pid = api.project("annotations")
    api("POST", f"/api/projects/{pid}/import", 201, json=[{"image": _data_url(c)} for c in COLORS])
    t = api.task_ids(pid)
    api.annotate(t[0], "cat")
    api.annotate(t[1], None, cancelled=True)
    api.annotate(t[2], "cat")
    time.sleep(0.01)
    api.annotate(t[2], "dog")  # the latest wins
    api.annotate(t[3], None)  # empty result (LS allows empty annotations by default)
    api.annotate(t[4], "dog")
    tasks = {task["id"]: task for task in client.list_tasks(pid)}
    assert sorted(tasks) == t
    assert [len(tasks[i]["annotations"]) for i in t] == [1, 1, 2, 1, 1, 0]
    config = parse_label_config(LABEL_CONFIG)
    assert task_label(tasks[t[0]], config) == "cat"
    assert task_label(tasks[t[2]], config) == "dog"
    assert task_label(tasks[t[4]], config) == "dog"
    reasons = {}
    for i in (t[1], t[3], t[5]):
        with pytest.raises(AnnotationSkipped) as err:
            task_label(tasks[i], config)
        reasons[i] = err.value.reason
    assert "cancelled" in reasons[t[1]] and "empty" in reasons[t[3]] and "no annotations" in reasons[t[5]]
    assert tasks[t[0]]["data"]["image"].startswith("data:image/png;base64,")


def test_predictions_order_the_labeling_stream(client: LabelStudioClient, api: Api) -> None:
    check_predictions_order_the_stream(client, api)


def test_predictions_order_the_labeling_stream_on_postgresql(label_studio_pg: Any) -> None:
    """The same writes, deletes and ``/next`` order with Label Studio on PostgreSQL (as in production), by PAT."""
    with LabelStudioClient(label_studio_pg.url, label_studio_pg.personal_access_token(), timeout=60, retries=2,
                           backoff=0.2) as client:
        check_predictions_order_the_stream(client, Api(label_studio_pg))


def check_predictions_order_the_stream(client: LabelStudioClient, api: Api) -> None:
    """Two rounds' predictions written, the older deleted; ``/next`` serves the newer's order with its pre-labels."""
    pid = api.project("ordering")
    api("POST", f"/api/projects/{pid}/import", 201, json=[{"image": _data_url(c)} for c in COLORS[:5]])
    t = api.task_ids(pid)
    ranked = [t[2], t[0], t[4], t[1], t[3]]  # most valuable first
    config = parse_label_config(LABEL_CONFIG)
    old = build_predictions(config, "round-1", [(i, "cat") for i in reversed(ranked)])
    assert client.import_predictions(pid, old) == 5
    new = build_predictions(config, "round-2", [(i, "dog") for i in ranked])
    assert client.import_predictions(pid, new, chunk_size=2) == 5  # 3 chunks
    project = client.set_ordering(pid, "round-2")
    assert (project["sampling"], project["model_version"]) == ("Uncertainty sampling", "round-2")
    assert client.model_versions(pid) == {"round-1": 5, "round-2": 5}

    assert client.delete_predictions(pid, except_version="round-2") == 5
    assert client.model_versions(pid) == {"round-2": 5}
    assert client.get_project(pid)["model_version"] == "round-2"  # deleting another version keeps it
    with pytest.raises(LabelStudioError, match="refusing"):
        client.delete_predictions(pid, except_version="round-9")

    served = []
    for _ in ranked:
        task = api("GET", f"/api/projects/{pid}/next")
        served.append(task["id"])
        assert [p["model_version"] for p in task["predictions"]] == ["round-2"]
        assert task["predictions"][0]["result"] == _choice("dog")  # the pre-label travels with the order
        api.annotate(task["id"], "cat")
    assert served == ranked


def test_old_predictions_are_deleted_in_bounded_calls(client: LabelStudioClient, api: Api) -> None:
    """Issue 9 item 2b: no call deletes more than ``batch`` predictions, the kept versions stay whole, the
    served one is never touched, and ``stop`` leaves the rest for later."""
    pid = api.project("bounded clean-up")
    api("POST", f"/api/projects/{pid}/import", 201, json=[{"image": _data_url(COLORS[i % 6])} for i in range(10)])
    t = api.task_ids(pid)
    config = parse_label_config(LABEL_CONFIG)
    assert client.import_predictions(pid, build_predictions(config, "isal-1", [(i, "cat") for i in t])) == 10
    assert client.import_predictions(pid, build_predictions(config, "isal-2", [(i, "dog") for i in t[:2]])) == 2
    assert client.import_predictions(pid, build_predictions(config, "isal-3", [(i, "dog") for i in t[:5]])) == 5
    client.set_ordering(pid, "isal-3")

    assert client.delete_old_predictions(pid, "isal-3", spare=["isal-2"], stop=lambda: True).deleted == 0
    # isal-1 (10 > batch 3): its 5 tasks holding no kept prediction in 2 Data Manager calls (3 + 2 tasks), its 5
    # predictions on tasks that also hold isal-2's or isal-3's one by one
    asked: list[float] = []
    report = client.delete_old_predictions(pid, "isal-3", spare=["isal-2"], batch=3,
                                           before_call=lambda: asked.append(time.monotonic()))
    # 8 calls: the listing of isal-1's predictions, 2 Data Manager calls, 5 single deletes
    assert (report.deleted, report.calls, report.stopped) == (10, 8, False)
    assert len(asked) == report.calls  # paced: each call, the listing included, waited for the annotators
    assert client.model_versions(pid) == {"isal-2": 2, "isal-3": 5}
    report = client.delete_old_predictions(pid, "isal-3", batch=3)  # 2 <= batch: one model-versions call
    assert (report.deleted, report.calls) == (2, 1)
    assert client.model_versions(pid) == {"isal-3": 5}
    assert client.get_project(pid)["model_version"] == "isal-3"
    served = api("GET", f"/api/projects/{pid}/next")
    assert [p["model_version"] for p in served["predictions"]] == ["isal-3"]
    with pytest.raises(LabelStudioError, match="refusing"):
        client.delete_old_predictions(pid, "isal-9")


def test_dropped_predictions_are_detected(client: LabelStudioClient, api: Api) -> None:
    pid = api.project("dropped")
    api("POST", f"/api/projects/{pid}/import", 201, json=[{"image": _data_url(c)} for c in COLORS[:3]])
    t = api.task_ids(pid)
    bad_result = [{"from_name": "nope", "to_name": "image", "type": "choices", "value": {"choices": ["cat"]}}]
    preds = [{"task": i, "model_version": "r1", "score": 0.5, "result": bad_result if i == t[1] else []} for i in t]
    with pytest.raises(PredictionsDropped, match="created 2 of 3") as err:
        client.import_predictions(pid, preds)
    assert (err.value.expected, err.value.created) == (3, 2)
    with pytest.raises(LabelStudioAPIError) as err2:  # a task of another project: LS refuses the whole batch
        client.import_predictions(pid, [{"task": 10**9, "model_version": "r1", "score": 0.5, "result": []}])
    assert err2.value.status_code == 400


def test_bad_keys_are_refused_without_showing_them(label_studio: Any, images_project: dict) -> None:
    wrong = "0" * 40
    with LabelStudioClient(label_studio.url, wrong, retries=0) as c, pytest.raises(LabelStudioAPIError) as err:
        c.get_project(images_project["id"])
    assert err.value.status_code == 401
    assert wrong not in str(err.value) and "authentication failed" in str(err.value)


def test_timings_for_1000_tasks(label_studio: Any, api: Api, capsys: pytest.CaptureFixture) -> None:
    """Not a benchmark gate (the CI machine is shared): correctness at scale, with the timings printed."""
    client = LabelStudioClient(label_studio.url, label_studio.token, timeout=120)
    pid = api.project("timings")
    api("POST", f"/api/projects/{pid}/import", 201, json=[{"image": f"data:image/png;base64,{i}"} for i in range(1000)])
    ids = api.task_ids(pid)
    api("POST", f"/api/projects/{pid}/import", 201,
        json=[{"data": {"image": "data:,x"}, "annotations": [{"result": _choice("cat")}]} for _ in range(200)])
    config = parse_label_config(LABEL_CONFIG)
    timings = {}
    start = time.perf_counter()
    tasks = client.list_tasks(pid)
    timings["list_tasks (1200 tasks, 200 annotated)"] = time.perf_counter() - start
    assert len(tasks) == 1200 and sum(1 for x in tasks if x["annotations"]) == 200
    for version in ("r1", "r2"):
        start = time.perf_counter()
        assert client.import_predictions(pid, build_predictions(config, version, [(i, "dog") for i in ids])) == 1000
        timings[f"import_predictions 1000 ({version})"] = time.perf_counter() - start
    client.set_ordering(pid, "r2")
    start = time.perf_counter()
    assert client.delete_predictions(pid, except_version="r2") == 1000
    timings["delete_predictions 1000"] = time.perf_counter() - start
    with capsys.disabled():
        print("\nLabel Studio timings: " + ", ".join(f"{k}: {v:.2f} s" for k, v in timings.items()))
