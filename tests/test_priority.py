"""Rounds run at a lower CPU priority than the web server (and Label Studio on the same host)."""

from __future__ import annotations

import os
import threading

import pytest

from isal_backend.priority import MAX_NICE, lower_priority
from isal_backend.settings import Settings, SettingsError

pytestmark = pytest.mark.skipif(os.uname().sysname != "Linux", reason="per-thread niceness is Linux's")


def niceness_in_a_thread(*nices: int) -> tuple[list[int], int]:
    """What lower_priority answered for each of ``nices`` on a new thread, and that thread's niceness after."""
    answers: list[int] = []
    after: list[int] = []

    def run() -> None:
        answers.extend(lower_priority(n) for n in nices)
        after.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return answers, after[0]


def test_only_the_calling_thread_is_lowered() -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)
    answers, after = niceness_in_a_thread(5)
    assert answers == [min(MAX_NICE, before + 5)] == [after]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the web server's threads keep theirs


def test_threads_a_lowered_thread_starts_inherit_its_niceness() -> None:
    """torch's worker threads start from the round's thread: they are background work too."""
    seen: list[int] = []

    def child() -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    def parent() -> None:
        seen.append(lower_priority(3))
        t = threading.Thread(target=child)
        t.start()
        t.join()

    t = threading.Thread(target=parent)
    t.start()
    t.join()
    assert seen[0] == seen[1] > os.getpriority(os.PRIO_PROCESS, 0) or seen[0] == MAX_NICE


def test_niceness_stops_at_19_and_zero_changes_nothing() -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)
    answers, after = niceness_in_a_thread(0, 15, 15)
    assert answers == [before, min(MAX_NICE, before + 15), MAX_NICE] and after == MAX_NICE


def test_the_setting_is_checked() -> None:
    assert Settings.from_env({}).worker_nice == 10
    assert Settings.from_env({"ISAL_WORKER_NICE": "0"}).worker_nice == 0
    for bad in ("20", "-1", "low"):
        with pytest.raises(SettingsError, match="ISAL_WORKER_NICE"):
            Settings.from_env({"ISAL_WORKER_NICE": bad})
