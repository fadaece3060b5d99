"""One torch thread for small linear algebra: heads, influence over a few thousand parameters.

Such operations gain nothing from a second thread, and on a busy machine each one waits on an OpenMP
barrier for it. Measured on 2 shared cores: cross-entropy and backward on 72 x 129 took 23 ms with two
threads against 0.64 ms with one; a cross-fitted round's heads 8-9 s against 0.4-0.7 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
