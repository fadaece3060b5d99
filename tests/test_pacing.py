"""Pacing a round's Label Studio calls around the annotators (isal_backend.pacing), on a simulated clock."""

from __future__ import annotations

import pytest

from isal_backend.pacing import IDLE_S, Pacer, delay


@pytest.mark.parametrize(
    ("ages", "expected", "wait", "why"),
    [
        ([], 0.3, 0.0, "no annotator event: go"),
        ([IDLE_S + 1, IDLE_S + 2], 0.3, 0.0, "the last event is old: no one labels"),
        ([0.1, 1.1, 2.1], 0.3, 0.2, "the last submit has not settled (its /next is still being asked)"),
        ([0.3, 1.3, 2.3], 0.3, 0.0, "settled, and 0.7 s remain before the next submit: the step fits"),
        ([0.6, 1.6, 2.6], 0.5, 0.7, "settled, but 0.4 s left is too short for 0.5 s: after the next one settles"),
        ([2.0, 3.0, 4.0], 0.5, 0.0, "the next submit is overdue by more than the settle time: the annotator paused"),
        ([0.5], 0.3, 0.0, "one event gives no pace: go once it settled"),
        ([0.5, 0.5 + IDLE_S + 1], 0.3, 0.0, "the earlier event is from another sitting: no pace"),
    ],
)
def test_delay_waits_for_the_annotators_next_quiet_moment(ages, expected, wait, why):
    assert delay(ages, expected, settle_s=0.3) == pytest.approx(wait), why


class Clock:
    """A simulated monotonic clock; sleeping moves it, and the annotator's events age with it."""

    def __init__(self, events_at: list[float]) -> None:
        self.now = 0.0
        self.events_at = events_at
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def ages(self) -> list[float]:
        return sorted(self.now - t for t in self.events_at if t <= self.now)


def test_a_step_waits_past_the_next_submit_and_remembers_what_it_took():
    """One annotator submitting every second: the step (0.5 s) starts just after a submit has settled."""
    clock = Clock(events_at=[-2.6, -1.6, -0.6, 0.4, 1.4, 2.4])
    took: dict[str, float] = {"write": 0.5}
    pacer = Pacer(clock.ages, settle_s=0.3, max_wait_s=5, took=took, sleep=clock.sleep, clock=lambda: clock.now)
    with pacer.step("write"):
        started = clock.now
        clock.sleep(0.25)  # the step's own work
    assert started == pytest.approx(0.7)  # the submit at 0.4 plus its settle: 0.7 s before the next one at 1.4
    assert took["write"] == pytest.approx(0.25)  # the next round expects this much
    assert pacer.summary["write"] == {"waited": 0.7, "took": 0.25, "times": 1}


def test_the_wait_is_bounded_when_there_is_no_quiet_moment():
    """Annotators submitting 4 times a second: no submit settles before the next; the step goes at ``max_wait_s``."""
    clock = Clock(events_at=[-3 + i * 0.25 for i in range(40)])
    pacer = Pacer(clock.ages, settle_s=0.3, max_wait_s=1.0, sleep=clock.sleep, clock=lambda: clock.now)
    assert pacer.wait("fetch") == pytest.approx(1.0)
    assert sum(clock.slept) == pytest.approx(1.0)


def test_an_unreadable_queue_costs_no_wait():
    def broken() -> list[float]:
        raise ConnectionError("Redis went away")

    clock = Clock(events_at=[])
    pacer = Pacer(broken, settle_s=0.3, max_wait_s=1.0, sleep=clock.sleep, clock=lambda: clock.now)
    assert pacer.wait("fetch") == 0.0 and clock.slept == []


def test_a_step_never_seen_is_expected_to_take_the_default():
    """0.3 s are left before the next submit: enough for a short step, too little for the default one."""
    clock = Clock(events_at=[-0.7, -1.7])
    pacer = Pacer(clock.ages, settle_s=0.3, max_wait_s=5, sleep=clock.sleep, clock=lambda: clock.now)
    assert delay(clock.ages(), 0.1, settle_s=0.3) == 0.0
    assert pacer.wait("fetch") == pytest.approx(0.6)  # the submit due at 0.3, plus its settle
