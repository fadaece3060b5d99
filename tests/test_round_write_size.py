"""The adaptive write size (issue 9, item 2a): a round writes what annotators can reach before the next one."""

from __future__ import annotations

from pathlib import Path

import pytest

from isal_backend.round import WRITE_HEADROOM, Round, adaptive_write_size
from isal_backend.settings import Settings, SettingsError
from isal_backend.store import ModelStore


def rounds(*labeled: int) -> list[dict]:
    return [{"round_id": f"isal-{i}", "labeled": n} for i, n in enumerate(labeled)]


def test_no_history_writes_the_floor() -> None:
    size, reason = adaptive_write_size([], labeled_now=0, minimum=50, cap=1000)
    assert size == 50 and "no earlier round" in reason and "ISAL_WRITE_MIN" in reason


def test_one_annotator_a_label_per_round_stays_at_the_floor() -> None:
    assert adaptive_write_size(rounds(0, 1, 2, 3), labeled_now=4, minimum=50, cap=1000)[0] == 50


def test_the_busiest_recent_interval_sets_the_size() -> None:
    """Labels per round interval = annotation rate x round duration: 30 labels came in while one round ran."""
    size, reason = adaptive_write_size(rounds(0, 10, 40, 45), labeled_now=50, minimum=50, cap=1000)
    assert size == WRITE_HEADROOM * 30 and "30 labels" in reason


def test_only_the_last_intervals_count_and_deletions_count_as_none() -> None:
    # a burst long ago (0 -> 500) no longer counts; a round after deleted labels gained nothing
    history = rounds(0, 500, 501, 502, 490)
    assert adaptive_write_size(history, labeled_now=495, minimum=10, cap=1000)[0] == WRITE_HEADROOM * 5


def test_the_cap_bounds_a_bulk_import_of_labels() -> None:
    size, reason = adaptive_write_size(rounds(0), labeled_now=5000, minimum=50, cap=1000)
    assert size == 1000 and "ISAL_WRITE_TOP_M" in reason


def test_no_cap_means_as_many_as_wanted() -> None:
    assert adaptive_write_size(rounds(0), labeled_now=5000, minimum=50, cap=0)[0] == WRITE_HEADROOM * 5000


def test_the_round_uses_the_policy_unless_told(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    s = Settings(model_dir=tmp_path, write_top_m=200, write_min=20)
    assert Round(1, None, store, s, parts=object()).chosen_write_size(0) == (20, "no earlier round; ISAL_WRITE_MIN")
    assert Round(1, None, store, s, parts=object(), write_size=7).chosen_write_size(0) == (7, "given by the caller")
    every = Settings(model_dir=tmp_path, write_top_m=0)
    assert Round(1, None, store, every, parts=object()).chosen_write_size(0)[0] == 0  # 0: every task
    store.record_history(1, {"round_id": "isal-a", "labeled": 0})
    store.record_history(1, {"round_id": "isal-b", "labeled": 10})
    assert Round(1, None, store, s, parts=object()).chosen_write_size(25)[0] == WRITE_HEADROOM * 15
    assert Round(1, None, store, s, parts=object()).chosen_write_size(100)[0] == 200  # 4 x 90, capped


@pytest.mark.parametrize(("env", "needle"), [
    ({"ISAL_WRITE_MIN": "0"}, "ISAL_WRITE_MIN"),
    ({"ISAL_WRITE_MIN": "many"}, "ISAL_WRITE_MIN"),
    ({"ISAL_WRITE_MIN": "500", "ISAL_WRITE_TOP_M": "100"}, "ISAL_WRITE_MIN=500 is above ISAL_WRITE_TOP_M=100"),
])
def test_bad_floors_are_refused_naming_the_variable(env: dict, needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env(env)


def test_the_floor_is_read() -> None:
    assert Settings.from_env({}).write_min == 20
    assert Settings.from_env({"ISAL_WRITE_MIN": "5", "ISAL_WRITE_TOP_M": "0"}).write_min == 5
