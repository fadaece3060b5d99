"""What an annotator sees: Label Studio 1.23.2's own labeling page in Debian's chromium (Playwright), after a round.

The backend under gunicorn with RQ workers (the e2e ``Stack``) orders a classification project of CIFAR-10
images and a detection project (``<RectangleLabels>``) of BCCD images. Then the admin logs in through the
login page, opens the project and clicks "Label All Tasks", as an annotator would: the task on screen must
be the round's most valuable one (its ``top_tasks[0]``), its image loaded, and the round's pre-label already
on it: the predicted choice checked, or the predicted boxes listed as regions. The choices run on SQLite and
PostgreSQL, the boxes on SQLite.

The screenshots are kept in the test's folder, and copied to the folder ``ISAL_SCREENSHOTS`` names, if set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import DATABASES, label_studio_on
from tests.test_dashboard_e2e import CHROMIUM_ARGS
from tests.test_e2e_classification import Stack, cifar_images, wait_for_round
from tests.test_e2e_detection import CLASSES as BOX_CLASSES
from tests.test_e2e_detection import bccd_files

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

CHOICES = ("airplane", "automobile", "frog")
CHOICES_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
                  + "".join(f'<Choice value="{c}"/>' for c in CHOICES) + "</Choices></View>")
BOXES_CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                + "".join(f'<Label value="{c}"/>' for c in BOX_CLASSES) + "</RectangleLabels></View>")
SCREENSHOTS = "ISAL_SCREENSHOTS"
BROWSER_TIMEOUT_MS = 60_000  # a 2-core machine shared with Label Studio, the backend and its workers


@pytest.fixture(scope="module", params=DATABASES)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One backend for both projects, sized to make a round in seconds (small CNN, a short detector run)."""
    s = Stack(label_studio_on(request, request.param), tmp_path_factory.mktemp(f"annotator-{request.param}"))
    s.env.update({"ISAL_BACKBONE": "small-cnn", "ISAL_FEATURE_DIM": "16", "ISAL_WRITE_TOP_M": "0",
                  "ISAL_DETECTION_STEPS": "30", "ISAL_DETECTION_FIRST_STEPS": "30",
                  "ISAL_DETECTION_IMAGE_SIZE": "256"})
    s.start()
    try:
        yield s
    finally:
        s.close()


def ordered_project(stack: Stack, title: str, config: str, files: list[tuple[str, bytes, str]],
                    results: dict[str, list[dict[str, Any]]]) -> tuple[int, dict[str, Any], dict[str, int]]:
    """A project of ``files`` with ``results`` (file name -> annotation result) annotated, connected to the
    backend, after its round: (project id, the round's report, task id by file name)."""
    project = stack.api("POST", "/api/projects", json={"title": title, "label_config": config})["id"]
    stack.api("POST", f"/api/projects/{project}/import",
              files=[(f"file{i}", (name, data, mime)) for i, (name, data, mime) in enumerate(files)])
    tasks = stack.api("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]
    # Label Studio stores an upload as "<8 hex>-<original name>".
    task_of = {t["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[1]: t["id"] for t in tasks}
    assert sorted(task_of) == sorted(name for name, _, _ in files)
    for name, result in results.items():
        stack.api("POST", f"/api/tasks/{task_of[name]}/annotations", json={"result": result})
    ml = stack.api("POST", "/api/ml", json={"url": stack.backend.url, "project": project, "title": "isal"})
    stack.api("POST", f"/api/ml/{ml['id']}/train", json={})
    report = wait_for_round(stack, project, lambda r: r.get("labeled") == len(results))
    assert report["order"].startswith("isal:"), report["order"]
    return project, report, task_of


def round_prediction(stack: Stack, project: int, report: dict[str, Any], task: int) -> dict[str, Any]:
    """The round's prediction for ``task`` (what the labeling page should pre-fill)."""
    ours = [p for p in stack.api("GET", "/api/predictions", params={"project": project})
            if p["model_version"] == report["round_id"] and p["task"] == task]
    assert len(ours) == 1, ours
    return ours[0]


class Annotator:
    """A logged-in browser tab on Label Studio."""

    def __init__(self, ls: Any, page: Any) -> None:
        self.ls, self.page = ls, page

    def log_in(self) -> None:
        page = self.page
        page.goto(f"{self.ls.url}/user/login/")
        page.fill("input[name=email]", self.ls.username)
        page.fill("input[name=password]", self.ls.password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        assert "/user/login" not in page.url, "Label Studio refused the admin's login"

    def label_all_tasks(self, project: int) -> int:
        """Open the project's Data Manager, click "Label All Tasks"; the task id Label Studio served the click."""
        page = self.page
        page.goto(f"{self.ls.url}/projects/{project}/data", wait_until="networkidle")
        with page.expect_response(lambda r: "/api/dm/actions" in r.url and "next_task" in r.url) as served:
            page.get_by_role("button", name="Label All Tasks").click()
        assert served.value.status == 200
        return int(served.value.json()["id"])

    def shown_task(self) -> int:
        """The task id the labeling page displays (its bottom bar: "#<id>" over "1 of N")."""
        label = self.page.locator(".lsf-current-task__task-id")
        label.wait_for()
        return int(label.evaluate("e => e.firstChild.textContent").strip().lstrip("#"))

    def image_width(self) -> int:
        """The natural width of the task's image once the page has loaded it."""
        image = self.page.locator("img[alt=image]")
        image.wait_for(state="attached")
        self.page.wait_for_function("() => { const i = document.querySelector('img[alt=image]');"
                                    " return i && i.complete && i.naturalWidth > 0; }")
        return int(image.evaluate("i => i.naturalWidth"))

    def screenshot(self, folder: Path, name: str) -> Path:
        shot = folder / name
        self.page.screenshot(path=str(shot))
        if os.environ.get(SCREENSHOTS):
            Path(os.environ[SCREENSHOTS]).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, Path(os.environ[SCREENSHOTS]) / name)
        return shot


def box_key(region: dict[str, Any]) -> tuple[str, str, float, float, float, float]:
    """What a drawn box must keep of its prediction: type, label, position and size in percent."""
    v = region["value"]
    return (region["type"], v["rectanglelabels"][0], *(float(v[k]) for k in ("x", "y", "width", "height")))


def same_boxes(drawn: list[dict[str, Any]], predicted: list[dict[str, Any]]) -> bool:
    """The same boxes, in any order, to 0.01 % of the image (the page recomputes them from pixels)."""
    a, b = sorted(map(box_key, drawn)), sorted(map(box_key, predicted))
    return len(a) == len(b) and all(x[:2] == y[:2] and x[2:] == pytest.approx(y[2:], abs=0.01)
                                    for x, y in zip(a, b, strict=True))


def in_browser(ls: Any, check: Any) -> None:
    """Run ``check(annotator)`` in a fresh headless chromium; no JavaScript error may happen on the page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.set_default_timeout(BROWSER_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            check(Annotator(ls, page))
            assert errors == []
        finally:
            browser.close()


def test_the_annotator_gets_the_top_task_with_its_choice_preselected(stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    images = cifar_images()
    per_class = {cls: [(name, data) for name, c, data in images if c == cls][:8] for cls in CHOICES}
    files = [(name, data, "image/jpeg") for cls in CHOICES for name, data in per_class[cls]]
    results = {name: [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [cls]}}]
               for cls in CHOICES for name, _ in per_class[cls][:4]}
    project, report, _ = ordered_project(stack, "annotator view", CHOICES_CONFIG, files, results)
    top = report["top_tasks"][0]
    predicted = round_prediction(stack, project, report, top)["result"][0]["value"]["choices"][0]

    def check(annotator: Annotator) -> None:
        annotator.log_in()
        served = annotator.label_all_tasks(project)
        assert served == top  # Label Studio's stream follows the round
        assert annotator.shown_task() == top  # and the page shows that task
        assert annotator.image_width() == 32  # its CIFAR-10 image, loaded
        for choice in CHOICES:
            box = annotator.page.locator(f".lsf-choices input[name={choice}]")
            if choice == predicted:
                expect(box).to_be_checked()  # the round's pre-label, already selected
            else:
                expect(box).not_to_be_checked()
        annotator.screenshot(tmp_path, f"labeling-choices-{stack.ls.database}.png")

    in_browser(stack.ls, check)


# SQLite only: on PostgreSQL the detector's round costs another minute and checks nothing the choices test does not.
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_the_annotator_gets_the_top_task_with_its_boxes_drawn(stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    images = bccd_files()[:16]
    files = [(name, data, "image/jpeg") for name, data, _ in images]
    results = {name: regions for name, _, regions in images[:8]}
    project, report, _ = ordered_project(stack, "annotator view boxes", BOXES_CONFIG, files, results)
    assert report["kind"] == "detection"
    top = report["top_tasks"][0]
    boxes = round_prediction(stack, project, report, top)["result"]
    assert boxes, "the round's detector drew no box on the top task: nothing to look for on the page"
    labels = sorted(r["value"]["rectanglelabels"][0] for r in boxes)

    def check(annotator: Annotator) -> None:
        annotator.log_in()
        assert annotator.label_all_tasks(project) == top
        assert annotator.shown_task() == top
        assert annotator.image_width() == boxes[0]["original_width"]
        # The regions of the annotation on screen, as the labeling page's own store serializes them: every
        # predicted box, where the detector put it.
        drawn = annotator.page.evaluate("() => window.Htx.annotationStore.selected.serializeAnnotation()")
        assert same_boxes(drawn, boxes), (drawn, boxes)
        # The region list shows them (it renders the rows that fit: 10 here), each with its label.
        rows = annotator.page.locator(".lsf-outliner-item .lsf-outliner-item__title")
        expect(rows.first).to_be_visible()
        shown = [t.strip() for t in rows.all_inner_texts()]
        assert 0 < len(shown) <= len(boxes) and set(shown) <= set(labels)
        annotator.screenshot(tmp_path, f"labeling-boxes-{stack.ls.database}.png")

    in_browser(stack.ls, check)
