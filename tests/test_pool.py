"""The job pool of `marlin extract` / `marlin prepare` (marlin.utils.pool): order, bounds, crash recovery.

The job functions live at module level: spawned workers import this module to unpickle them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from marlin.utils.pool import WorkerDied, run_jobs


def square(x: int) -> int:
    time.sleep(0.01 * (x % 3))  # uneven durations: completion order differs from input order
    return x * x


def crash_on_3(x: int) -> int:
    if x == 3:
        os._exit(1)  # like a segfault or an OOM kill: no exception, the worker process is gone
    return x * x


def wait_for_flag(job: tuple[int, str]) -> int:
    """Item 0 waits until the parent saw another result first (so 'as completed' is tested, not timed)."""
    i, flag = job
    deadline = time.monotonic() + 30
    while i == 0 and not Path(flag).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return i


def fail_on_2(x: int) -> int:
    if x == 2:
        raise KeyError(x)
    return x


def counted(n: int, pulled: list[int]) -> Iterator[int]:
    """range(n), counting in ``pulled[0]`` how many items were read."""
    for x in range(n):
        pulled[0] += 1
        yield x


@pytest.mark.parametrize(("workers", "max_in_flight", "bound"), [(0, None, 1), (2, None, 4), (1, 1, 1)])
def test_ordered_results_equal_inline_and_items_are_read_at_most_max_in_flight_ahead(workers, max_in_flight, bound):
    pulled, ahead, out = [0], [], []
    for x, y in run_jobs(square, counted(9, pulled), workers=workers, ordered=True, max_in_flight=max_in_flight):
        ahead.append(pulled[0] - len(out))
        out.append((x, y))
    assert out == [(x, x * x) for x in range(9)]  # same as inline, in input order
    assert max(ahead) == bound  # never more in flight, and the pool does fill up to it


def test_unordered_yields_as_completed_with_the_same_results(tmp_path):
    flag = tmp_path / "go"
    seen = []
    for _, i in run_jobs(wait_for_flag, [(i, str(flag)) for i in range(4)], workers=2):
        seen.append(i)
        flag.touch()
    assert seen[0] != 0 and sorted(seen) == [0, 1, 2, 3]  # item 0 only finished once another came back


@pytest.mark.parametrize("ordered", [True, False])
def test_a_job_that_kills_its_worker_fails_alone_and_the_batch_goes_on(ordered):
    out = list(run_jobs(crash_on_3, range(7), workers=2, ordered=ordered))
    assert sorted(x for x, _ in out) == list(range(7))  # every item exactly once
    if ordered:
        assert [x for x, _ in out] == list(range(7))
    results = dict(out)
    assert isinstance(results.pop(3), WorkerDied)
    assert results == {x: x * x for x in results}  # the jobs the broken pool held were rerun, not failed


def test_a_job_that_raises_stops_the_batch():
    with pytest.raises(KeyError):
        list(run_jobs(fail_on_2, range(5), workers=0))
    with pytest.raises(KeyError):
        list(run_jobs(fail_on_2, range(5), workers=1, ordered=True))


def test_max_in_flight_must_be_positive():
    with pytest.raises(ValueError, match="max_in_flight must be >= 1"):
        list(run_jobs(square, range(3), workers=1, max_in_flight=0))
