"""One torch thread for small linear algebra: heads, influence over a few thousand parameters.

Such operations gain nothing from a second thread, and on a busy machine each one waits on an OpenMP
barrier for it. Measured on 2 shared cores: cross-entropy and backward on 72 x 129 took 23 ms with two
threads against 0.64 ms with one; a cross-fitted round's heads 8-9 s against 0.4-0.7 s.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# torch's thread count is process-wide: blocks running at once on several threads (the embedded queue's
# workers) share one count, and the last block to leave restores the count from before the first.
_lock = threading.Lock()
_inside = 0
_before = 0


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the count from before (nested and concurrent
    blocks included)."""
    global _inside, _before
    with _lock:
        if _inside == 0:
            _before = torch.get_num_threads()
            torch.set_num_threads(1)
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                torch.set_num_threads(_before)
