"""A lower CPU priority for the threads that run rounds: they are background work.

On a host shared with Label Studio (the compose file's layout, and a 2-core machine like ours), an
annotator's ``/next`` should not wait for a core behind a round. On Linux niceness belongs to a thread, and
the threads it starts (torch's worker threads among them) inherit it; elsewhere the whole process is lowered.
No torch here: the embedded queue imports it.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

#: The most niceness there is (the lowest priority).
MAX_NICE = 19


def lower_priority(nice: int) -> int:
    """Add ``nice`` to the calling thread's niceness (at most :data:`MAX_NICE`); returns the niceness now.

    Lowering needs no privilege; should the system refuse anyway, only the preference is lost (a warning).
    """
    who = threading.get_native_id() if os.uname().sysname == "Linux" else 0
    now = os.getpriority(os.PRIO_PROCESS, who)
    if nice <= 0:
        return now
    try:
        os.setpriority(os.PRIO_PROCESS, who, min(MAX_NICE, now + nice))
    except OSError as exc:
        log.warning("could not lower the priority of the round's thread by %d: %s", nice, exc)
    return os.getpriority(os.PRIO_PROCESS, who)
