"""Worker processes with per-item time limits, and the background prefetch."""
from __future__ import annotations

import os
import signal
import time

import pytest

from dfpipe.manifests.workers import prefetch, run_parallel


def _interrupted(item: int) -> int:
    os.kill(os.getpid(), signal.SIGINT)  # what a Ctrl-C sent to the whole process group does to a worker
    time.sleep(0.2)
    return item * 10


def _square_or_fail(item: int) -> int:
    if item == 2:
        raise ValueError("cannot read\nframe 7")
    return item * item


def _sleep(item: float) -> float:
    time.sleep(item)
    return item


def test_a_ctrl_c_is_the_parents_to_handle_not_a_failure_of_the_workers_item():
    results = sorted(run_parallel(_interrupted, [1, 2], workers=2, timeout=None))
    assert results == [(1, True, 10), (2, True, 20)]


def test_each_item_ends_with_its_result_or_a_one_line_reason():
    results = sorted(run_parallel(_square_or_fail, [1, 2, 3], workers=2, timeout=None))
    assert results == [(1, True, 1), (2, False, "ValueError: cannot read frame 7"), (3, True, 9)]
    assert sorted(run_parallel(_square_or_fail, [1, 2, 3], workers=0, timeout=None)) == results


def test_an_item_over_its_time_limit_is_killed_and_the_others_go_on():
    started = time.monotonic()
    results = sorted(run_parallel(_sleep, [0.1, 30.0], workers=2, timeout=1.0))
    assert results[0] == (0.1, True, 0.1)
    assert results[1][:2] == (30.0, False) and "timed out after 1 s" in results[1][2]
    assert time.monotonic() - started < 15


def test_prefetch_keeps_the_order_and_raises_the_producers_error_in_the_consumer():
    assert list(prefetch(iter(range(50)), 4)) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(broken(), 2):
            got.append(item)
    assert got == [1]
