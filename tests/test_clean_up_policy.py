"""What a round deletes after it (issue 9, item 2b): never more than two rounds' predictions stay, and the
previous round's go only while no newer round waits. The bounded calls themselves are tested against the real
Label Studio in test_labelstudio_e2e.py."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from isal_backend.jobs import entry
from isal_backend.labelstudio.client import CleanUpReport
from isal_backend.labelstudio.datastore import LabelStudioDatastore, previous_version
from isal_backend.settings import Settings


class FakeClient:
    """model_versions and delete_old_predictions over a dict of {version: count}."""

    def __init__(self, versions: dict[str, int]) -> None:
        self.versions = dict(versions)
        self.reads = 0  # model-versions GETs (a query over the project's predictions each)
        self.call_seconds = 0.0  # what each delete call is reported to have taken

    def model_versions(self, project_id: int) -> dict[str, int]:
        self.reads += 1
        return dict(self.versions)

    def delete_old_predictions(self, project_id: int, keep: str, spare: Collection[str] = (), batch: int = 100,
                               stop: Callable[[], bool] | None = None,
                               versions: Mapping[str, int] | None = None,
                               before_call: Callable[[], object] | None = None) -> CleanUpReport:
        report = CleanUpReport()
        known = dict(versions) if versions is not None else self.model_versions(project_id)
        assert known == self.versions, "a caller passed versions that are not Label Studio's"
        for version in sorted(v for v in known if v != keep and v not in spare):
            if before_call is not None:
                before_call()
            if stop is not None and stop():
                report.stopped = True
                break
            report.deleted += self.versions.pop(version)
            report.calls += 1
            report.longest_call_seconds = self.call_seconds
        return report

    def import_predictions(self, project_id: int, predictions: list[dict]) -> int:
        self.held_while_writing = dict(self.versions)
        for p in predictions:
            self.versions[p["model_version"]] = self.versions.get(p["model_version"], 0) + 1
        return len(predictions)

    def set_ordering(self, project_id: int, model_version: str) -> None:
        self.ordering = model_version


def datastore(versions: dict[str, int], make_room: bool = False,
              before_call: Callable[[], object] | None = None) -> LabelStudioDatastore:
    return LabelStudioDatastore(FakeClient(versions), 1, make_room=make_room,  # type: ignore[arg-type]
                                before_call=before_call)


def test_the_previous_version_is_the_newest_older_round() -> None:
    versions = ["isal-20260101T01", "isal-20260101T02", "isal-20260101T03", "initial", "someone-else"]
    assert previous_version(versions, "isal-20260101T03") == "isal-20260101T02"
    assert previous_version(versions, "isal-20260101T01") is None
    assert previous_version(["isal-20260101T05"], "isal-20260101T04") is None  # newer is not previous


def test_without_a_newer_round_every_older_version_goes() -> None:
    store = datastore({"isal-1": 50, "isal-2": 50, "isal-3": 50, "other": 3})
    assert store.clean_up("isal-3", stop=lambda: False) == 103
    assert store.client.versions == {"isal-3": 50}
    assert store.last_clean_up is not None and not store.last_clean_up.stopped


def test_a_clean_up_reads_the_versions_once() -> None:
    """Each model-versions GET is a query over the project's predictions, beside the annotators' /next."""
    store = datastore({"isal-1": 20, "isal-2": 20, "isal-3": 20})
    store.clean_up("isal-3", stop=lambda: False)
    assert store.client.versions == {"isal-3": 20} and store.client.reads == 1
    made = datastore({"isal-3": 20, "isal-4": 20}, make_room=True)
    made.make_room("isal-5")
    assert made.client.reads == 1


def test_a_newer_round_waiting_leaves_only_the_previous_version() -> None:
    store = datastore({"isal-1": 50, "isal-2": 50, "isal-3": 50, "isal-4": 60})
    assert store.clean_up("isal-4", stop=lambda: True) == 100  # isal-1 and isal-2 go regardless
    assert store.client.versions == {"isal-3": 50, "isal-4": 60}
    assert store.last_clean_up.stopped
    # the round that waited deletes everything older than its own predecessor
    store.client.versions["isal-5"] = 60
    store.clean_up("isal-5", stop=lambda: True)
    assert store.client.versions == {"isal-4": 60, "isal-5": 60}



def predictions(version: str, count: int) -> list[dict]:
    return [{"task": i, "model_version": version, "score": 0.0, "result": []} for i in range(count)]


def test_after_a_cut_short_clean_up_making_room_leaves_only_the_served_round() -> None:
    """The round that waited finds its predecessor's predecessor still there: it goes before the write, so Label
    Studio never holds three rounds at once (bench live saw 3 x the write size in that moment)."""
    store = datastore({"isal-2": 50, "isal-3": 50, "other": 2}, make_room=True)
    assert store.make_room("isal-4") == 52
    assert store.write("isal-4", predictions("isal-4", 50)) == 50
    assert store.client.held_while_writing == {"isal-3": 50}  # the served round stays until the new one is
    assert store.client.versions == {"isal-3": 50, "isal-4": 50}
    assert store.client.ordering == "isal-4"
    assert store.room_made is not None and store.room_made.deleted == 52


def test_with_nothing_in_the_way_making_room_deletes_nothing() -> None:
    store = datastore({"isal-3": 50}, make_room=True)
    assert store.make_room("isal-4") == 0 and store.room_made is None
    first = datastore({}, make_room=True)
    assert first.make_room("isal-1") == 0  # the first round of a project
    first.write("isal-1", predictions("isal-1", 10))
    assert first.client.versions == {"isal-1": 10}


def test_without_make_room_nothing_is_deleted_before_a_write() -> None:
    """ISAL_DELETE_OLD_PREDICTIONS=false: the datastore is made without make_room and keeps everything."""
    store = datastore({"isal-2": 50, "isal-3": 50})
    assert store.make_room("isal-4") == 0
    store.write("isal-4", predictions("isal-4", 5))
    assert store.client.held_while_writing == {"isal-2": 50, "isal-3": 50}


def test_a_paced_clean_up_waits_before_each_of_its_calls() -> None:
    """The worker's pacer (isal_backend.pacing) is asked before the versions are read and before each delete."""
    asked: list[int] = []
    store = datastore({"isal-1": 20, "isal-2": 20, "isal-3": 20}, before_call=lambda: asked.append(len(asked)))
    assert store.clean_up("isal-3", stop=lambda: False) == 40
    assert len(asked) == 1 + 2  # model-versions, then isal-1 and isal-2


def test_a_clean_up_tells_the_next_how_long_its_calls_held_label_studio(tmp_path: Path) -> None:
    """The pacer gives each clean-up call a moment as long as the longest one took last time (a delete can
    hold Label Studio longer than the round's write did)."""
    entry._STEP_TIMES.pop(1, None)
    store = datastore({"isal-1": 20, "isal-2": 20, "isal-3": 20})
    store.client.call_seconds = 0.4
    entry.clean_up_policy(Settings(model_dir=tmp_path), store)("isal-3")
    assert entry._STEP_TIMES[1]["clean_up"] == 0.4
    nothing = datastore({"isal-3": 20})
    entry.clean_up_policy(Settings(model_dir=tmp_path), nothing)("isal-3")  # no call: nothing learned
    assert entry._STEP_TIMES.pop(1)["clean_up"] == 0.4
