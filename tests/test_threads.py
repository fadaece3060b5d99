"""single_torch_thread under concurrency: torch's thread count is process-wide."""

from __future__ import annotations

import threading

import torch

from isal_backend.threads import single_torch_thread


def test_overlapping_blocks_on_two_threads_restore_the_count_from_before() -> None:
    torch.set_num_threads(2)
    inside_a, leave_a, inside_b = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def a() -> None:
        with single_torch_thread():
            inside_a.set()
            leave_a.wait(5)  # leaves while b is still inside

    def b() -> None:
        inside_a.wait(5)
        with single_torch_thread():
            inside_b.set()
            leave_a.set()
            ta.join(5)
            seen["b_after_a_left"] = torch.get_num_threads()

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start(), tb.start()
    tb.join(10)
    assert inside_b.is_set()
    assert seen["b_after_a_left"] == 1  # a leaving does not give b two threads
    assert torch.get_num_threads() == 2  # the last to leave restores the count from before the first


def test_nested_blocks() -> None:
    torch.set_num_threads(2)
    with single_torch_thread():
        with single_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
