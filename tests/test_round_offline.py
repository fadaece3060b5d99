"""The backend's round for a classification project on the offline datastore: no Label Studio, real images.

What the round does with every kind of task (unlabeled, labeled, skipped by the annotator, labeled with
a class the config lacks, a broken image), cold start, ISAL, the stream it serves, and the stored model
that places new tasks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from isal_backend.bench.datasets import label_config, png_bytes
from isal_backend.bench.offline import OfflineDatastore
from isal_backend.jobs.entry import stored_predictions
from isal_backend.labelstudio.config import ClassificationConfig
from isal_backend.labelstudio.convert import prediction_result
from isal_backend.pacing import Pacer
from isal_backend.round import Round
from isal_backend.settings import Settings
from isal_backend.store import ModelStore
from isal_backend.tasks import TaskParts
from isal_backend.tasks.classification import ClassificationTask

CLASSES = ["red", "green", "blue"]
CONFIG = ClassificationConfig("image", "image", "label", CLASSES)


def colour_image(label: int, rng: np.random.Generator) -> bytes:
    """A 24x24 noisy image whose dominant channel is its class: learnable from random-init features."""
    pixels = rng.integers(0, 90, size=(24, 24, 3), dtype=np.uint8)
    pixels[..., label] += rng.integers(100, 160, dtype=np.uint8)
    return png_bytes(pixels)


class Project:
    def __init__(self, n: int = 60, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.truth = {i: int(i % 3) for i in range(1, n + 1)}
        self.blobs = {f"img-{i}": colour_image(y, rng) for i, y in self.truth.items()}
        self.blobs["img-broken"] = b"definitely not a png"
        refs = {i: f"img-{i}" for i in self.truth} | {n + 1: "img-broken"}
        self.datastore = OfflineDatastore(4, label_config("classification", CLASSES), refs, self.blobs.__getitem__)

    def label(self, task_ids: Any, label: str | None = None) -> None:
        """Annotate with the true class, or with ``label`` (which the config may not have)."""
        for i in task_ids:
            result = prediction_result(CONFIG, CLASSES[self.truth[i]])
            result[0]["value"]["choices"] = [label or CLASSES[self.truth[i]]]
            self.datastore.annotate(i, result)


def settings(tmp_path: Path, **extra: Any) -> Settings:
    """Every open task written (ISAL_WRITE_TOP_M=0): these tests check the whole order, not its size."""
    return Settings(model_dir=tmp_path, backbone="small-cnn", feature_dim=16, **{"write_top_m": 0, **extra})


def test_cold_start_then_isal_with_every_kind_of_task(tmp_path: Path) -> None:
    project = Project()
    store = ModelStore(tmp_path)
    project.label(range(1, 7, 3))  # two labels, both green: nothing to learn from yet
    cold = Round(4, project.datastore, store, settings(tmp_path)).run()
    assert cold["order"].startswith("cold-start") and "1 class(es)" in cold["cold_start_reason"]
    assert cold["written"] == cold["unlabeled"] == 58 and cold["labeled"] == 2
    assert [s["task"] for s in cold["skipped"]] == [61] and "could not be loaded" in cold["skipped"][0]["reason"]
    served = project.datastore.stream(1)[0]
    assert project.datastore.prediction(served)["result"] == []  # no model yet: no pre-label
    assert served == cold["top_tasks"][0]

    project.label(range(2, 31))
    project.datastore.annotate(40, [], skipped=True)  # the annotator skipped it
    project.label([41], label="purple")  # a class the config does not have
    report = Round(4, project.datastore, store, settings(tmp_path)).run()
    assert report["order"].startswith("isal: cross-fitted") and report["influence_units"] == 5
    assert report["labeled"] == 30 and report["validation_accuracy"] > 0.6
    reasons = {s["task"]: s["reason"] for s in report["skipped"]}
    assert "cancelled" in reasons[40] and "not in the label config" in reasons[41]
    assert "could not be loaded" in reasons[61]
    open_tasks = sorted(set(range(31, 61)) - {40, 41})
    assert report["written"] == report["unlabeled"] == len(open_tasks)
    stream = project.datastore.stream(len(open_tasks) + 5)
    assert stream[: len(open_tasks)] == report["top_tasks"][:20] + stream[20 : len(open_tasks)]
    assert 40 not in stream and 41 not in stream  # skipped tasks leave the stream
    top = project.datastore.prediction(stream[0])
    assert top["score"] == 0.0 and top["result"][0]["value"]["choices"][0] in CLASSES
    assert report["timings"].keys() >= {"fetch_seconds", "features_seconds", "fit_seconds", "s_test_seconds",
                                        "score_seconds", "write_back_seconds", "total_seconds"}

    # The stored round places every pool task by its own influence score, exactly as the round ranked it.
    stored = store.load(4)
    assert stored is not None and stored.meta["kind"] == "classification" and stored.meta["strategy"] == "isal"
    task = ClassificationTask(CONFIG, TaskParts(settings(tmp_path), 4, store.project_dir(4)))
    model = task.load(stored)
    pool = project.datastore.tasks_by_id(open_tasks)
    predictions, skipped = stored_predictions(task, model, pool, project.datastore.image, stored.round_id)
    assert skipped == [] and sorted(p["score"] for p in predictions) == pytest.approx(
        [j / len(open_tasks) for j in range(len(open_tasks))], abs=1e-6)
    # The model's pre-labels are right on most of these easy images.
    correct = sum(p["result"][0]["value"]["choices"][0] == CLASSES[project.truth[p["task"]]] for p in predictions)
    assert correct >= 0.8 * len(predictions)


def test_a_round_again_on_the_same_state_gives_the_same_order_and_reuses_the_projection(tmp_path: Path) -> None:
    project = Project(seed=1)
    project.label(range(1, 25))
    store = ModelStore(tmp_path)
    first = Round(4, project.datastore, store, settings(tmp_path)).run()
    second = Round(4, project.datastore, store, settings(tmp_path)).run()
    assert first["top_tasks"] == second["top_tasks"]
    assert first["projection"]["reused"] is False and second["projection"]["reused"] is True
    assert second["warm_start"] is True and first["round_id"] != second["round_id"]


class WatchedDatastore(OfflineDatastore):
    """Records the versions held when each write begins."""

    def write(self, model_version: str, predictions: Any) -> int:
        self.held = getattr(self, "held", []) + [sorted(self._predictions)]
        return super().write(model_version, predictions)


def test_a_round_makes_room_so_a_write_never_finds_more_than_the_served_round(tmp_path: Path) -> None:
    """Two rounds without clean-up (a newer round kept waiting) leave two versions; the third round deletes
    the older before it writes, so no more than two rounds' predictions exist, not even mid-write."""
    project = Project(seed=4)
    datastore = WatchedDatastore(4, label_config("classification", CLASSES), {i: f"img-{i}" for i in project.truth},
                                 project.blobs.__getitem__)
    project.datastore = datastore
    project.label(range(1, 25))
    store = ModelStore(tmp_path)
    first = Round(4, datastore, store, settings(tmp_path), write_size=5).run()
    second = Round(4, datastore, store, settings(tmp_path), write_size=5).run()
    assert datastore.held == [[], [first["model_version"]]]
    third = Round(4, datastore, store, settings(tmp_path), write_size=5).run()
    assert datastore.held[-1] == [second["model_version"]] and third["made_room"] == 5
    assert sorted(datastore._predictions) == [second["model_version"], third["model_version"]]
    assert datastore.served == third["model_version"]


class BrokenRoomDatastore(OfflineDatastore):
    def make_room(self, model_version: str) -> int:
        raise ConnectionError("Label Studio went away for a moment")


def test_a_failure_to_make_room_costs_the_bound_not_the_round(tmp_path: Path) -> None:
    project = Project(seed=5)
    project.datastore = BrokenRoomDatastore(4, label_config("classification", CLASSES),
                                            {i: f"img-{i}" for i in project.truth}, project.blobs.__getitem__)
    project.label(range(1, 25))
    report = Round(4, project.datastore, ModelStore(tmp_path), settings(tmp_path), write_size=5).run()
    assert report["written"] == 5 and "went away" in report["make_room_error"]


def test_a_paced_round_waits_for_the_annotators_submit_to_settle_and_reports_it(tmp_path: Path) -> None:
    """An annotator submitted just now: the fetch waits until that submit's /next has been served; the write,
    with no second event to give a pace, goes at once. The report says what each step waited and took."""
    project = Project(seed=6)
    project.label(range(1, 25))
    submitted = time.monotonic()
    took: dict[str, float] = {}
    pacer = Pacer(lambda: [time.monotonic() - submitted], settle_s=0.2, max_wait_s=1.0, took=took)
    report = Round(4, project.datastore, ModelStore(tmp_path), settings(tmp_path), write_size=5, pacer=pacer).run()
    assert report["written"] == 5
    # the thumbnails of the stream head read the datastore's images: paced too
    assert set(report["pacing"]) == {"fetch", "write", "thumbnails"}
    assert 0.1 <= report["pacing"]["fetch"]["waited"] <= 0.5
    assert report["pacing"]["write"]["waited"] < 0.05 and report["pacing"]["write"]["times"] == 1
    assert set(took) == {"fetch", "write", "thumbnails"}  # the project's next round expects as much

    # the same stream head again: its thumbnails are there, nothing is read, so nothing waits for a moment
    again = Pacer(lambda: [time.monotonic() - submitted], settle_s=0.2, max_wait_s=1.0, took=took)
    report = Round(4, project.datastore, ModelStore(tmp_path), settings(tmp_path), write_size=5, pacer=again).run()
    assert "thumbnails" not in report["pacing"]


def test_a_round_a_newer_one_waits_for_leaves_the_thumbnails_to_it(tmp_path: Path) -> None:
    """The thumbnails come after the commit: when a newer round waits, its reads would only delay that one."""
    project = Project(seed=7)
    project.label(range(1, 25))
    store = ModelStore(tmp_path)
    report = Round(4, project.datastore, store, settings(tmp_path), write_size=5, superseded=lambda: True).run()
    assert report["stream_head"] and not (store.project_dir(4) / "thumbnails").exists()
    report = Round(4, project.datastore, store, settings(tmp_path), write_size=5, superseded=lambda: False).run()
    assert len(list((store.project_dir(4) / "thumbnails").glob("*.jpg"))) == len(report["stream_head"])


def test_a_baseline_round_stores_its_keys_so_new_tasks_are_placed_by_them(tmp_path: Path) -> None:
    project = Project(seed=2)
    project.label(range(1, 25))
    store = ModelStore(tmp_path)
    report = Round(4, project.datastore, store, settings(tmp_path, strategy="margin"), write_size=5).run()
    assert report["order"] == "margin (baseline strategy)" and report["written"] == 5
    stored = store.load(4)
    task = ClassificationTask(CONFIG, TaskParts(settings(tmp_path), 4, store.project_dir(4)))
    pool = project.datastore.tasks_by_id(report["top_tasks"][:5])
    predictions, _ = stored_predictions(task, task.load(stored), pool, project.datastore.image, stored.round_id)
    assert [p["score"] for p in predictions] == pytest.approx([j / 36 for j in range(5)], abs=1e-6)  # 36 pool tasks


def test_a_large_import_is_featurized_over_rounds_each_serving_an_order(tmp_path: Path) -> None:
    project = Project(n=40, seed=3)
    project.label(range(31, 41))  # the labeled images are featurized first, whatever their place in the project
    store = ModelStore(tmp_path)
    s = settings(tmp_path, round_new_images=12)
    first = Round(4, project.datastore, store, s).run()
    assert first["labeled"] == 10 and first["unlabeled"] == 2 and first["features_pending"] == 29  # 30 + broken
    assert first["written"] == 2 and first["order"].startswith("isal:")  # an order now, of what is featurized
    second = Round(4, project.datastore, store, s).run()
    assert second["unlabeled"] == 14 and second["features_pending"] == 17
    third = Round(4, project.datastore, store, s).run()
    fourth = Round(4, project.datastore, store, s).run()
    assert "features_pending" not in fourth and fourth["unlabeled"] == 30 and third["unlabeled"] == 26
    assert [s["task"] for s in fourth["skipped"]] == [41]  # the broken image, once it was tried
