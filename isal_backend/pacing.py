"""Pacing: a round's calls to Label Studio wait for a moment when its annotators are not asking for theirs.

Label Studio sends the annotation webhook synchronously, inside the annotator's submit, and its UI asks
for the next task (``/next``) as soon as the submit returns. A round started by that webhook would read
Label Studio at exactly that moment, and every call of ours then slows the annotator's ``/next``: on
SQLite one writer holds the database at a time, and on a small machine Label Studio, the backend and the
worker share the cores. Annotators label at a steady pace, so the next submit can be foreseen: a step
waits until the last event has settled (its ``/next`` answered) and, when it would not be over before
the next submit is due, until that one has settled too. Every wait is bounded: with many annotators
there is no quiet moment, and the new order must still be served.

Plain Python: the pacer knows events only as their ages, never who sent them or what the step does.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: Events further apart than this are separate sittings: no pace is read across such a gap, and a
#: project whose last event is older is idle (nothing to wait for).
IDLE_S = 10.0
#: Margin a step keeps before the next submit is due.
GUARD_S = 0.05
#: What a step is expected to take before the pacer has seen it run.
DEFAULT_STEP_S = 0.3
#: Shorter waits are not worth a sleep (and a clock's rounding could repeat them forever).
MIN_WAIT_S = 0.001
#: Recent events a queue keeps per project (the pace is their median interval).
KEEP_EVENTS = 8


def delay(ages: Sequence[float], expected_s: float, settle_s: float) -> float:
    """Seconds to wait before a step that takes about ``expected_s`` (0: go now).

    ``ages``: seconds since each of the project's recent annotator events, newest first. Wait until the
    newest is ``settle_s`` old; then go if the step ends before the next event is due (the median
    interval of the recent ones), or if that event is overdue by more than ``settle_s`` (the annotator
    paused: nothing to foresee); otherwise until the next event is due and has settled.
    """
    if not ages or ages[0] >= IDLE_S:
        return 0.0
    since = ages[0]
    if since < settle_s:
        return settle_s - since
    gaps = []
    for newer, older in zip(ages, ages[1:], strict=False):
        if older - newer > IDLE_S:
            break
        gaps.append(older - newer)
    if not gaps:
        return 0.0
    until_next = statistics.median(gaps) - since
    if until_next >= expected_s + GUARD_S or until_next < -settle_s:
        return 0.0
    return until_next + settle_s


class Pacer:
    """Gates one round's steps on ``activity`` (ages of the project's recent annotator events, newest first).

    ``took``: what each step took when it last ran (shared across a project's rounds by the caller), the
    expected duration of the next one. :attr:`summary` says what each step waited and took, for the report.
    """

    def __init__(self, activity: Callable[[], Sequence[float]], settle_s: float, max_wait_s: float,
                 took: MutableMapping[str, float] | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.activity = activity
        self.settle_s = settle_s
        self.max_wait_s = max_wait_s
        self.took = took if took is not None else {}
        self.sleep = sleep
        self.clock = clock
        self.summary: dict[str, dict[str, float]] = {}

    def wait(self, step: str, expected_s: float | None = None) -> float:
        """Wait (at most ``max_wait_s``) for a moment to run ``step``; returns the seconds waited.

        ``expected_s``: how long the step will hold Label Studio (default: what it took last time)."""
        expected = expected_s if expected_s is not None else self.took.get(step, DEFAULT_STEP_S)
        start = self.clock()
        deadline = start + self.max_wait_s
        while True:
            try:
                ages = self.activity()
            except Exception as exc:  # noqa: BLE001 - pacing is a courtesy: a queue that cannot tell costs nothing
                log.debug("pacing %s: the project's recent events could not be read (%s); not waiting", step, exc)
                break
            wanted = delay(ages, expected, self.settle_s)
            left = deadline - self.clock()
            if wanted < MIN_WAIT_S or left <= 0:
                break
            self.sleep(min(wanted, left))
        waited = self.clock() - start
        entry = self.summary.setdefault(step, {"waited": 0.0, "took": 0.0, "times": 0})
        entry["waited"] = round(entry["waited"] + waited, 3)
        entry["times"] += 1
        return waited

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Wait for a moment, run the block, and remember how long it took (the next round expects as much)."""
        self.wait(name)
        start = self.clock()
        try:
            yield
        finally:
            took = self.clock() - start
            self.took[name] = took
            entry = self.summary[name]
            entry["took"] = round(entry["took"] + took, 3)


@contextmanager
def unpaced(_name: str) -> Iterator[None]:
    """No pacer (the benchmark's offline datastore, or pacing turned off): run the block at once."""
    yield
