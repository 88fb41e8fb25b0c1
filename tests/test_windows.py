"""Windows of units of work (antenna_flows/orchestration/windows.py), without Prefect: how a window is
opened is the test's, so each rule is seen on its own.

- a window takes every unit that comes while it is open, runs them concurrently, each with its own
  retries, and counts what it did per job;
- Prefect is not the data plane: a window that fails or never starts costs the work one grace period
  (then units run plainly for a while), with one warning line per worker, not one per unit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from antenna_flows.orchestration.windows import Tally, Unit, Windows, jobs_of_label


async def test_units_run_when_windows_cannot_start(caplog):
    """A window that fails, or never starts, costs the work at most one grace period, then none."""

    async def broken(number: int) -> None:
        raise RuntimeError("Prefect task engine unavailable")

    async def hung(number: int) -> None:
        await asyncio.sleep(3600)

    for open_window in (broken, hung):
        windows = Windows("plain-fallback", window_s=1.0, start_grace_s=0.2, open_window=open_window)
        done: list[int] = []

        async def unit(i: int) -> int:
            done.append(i)
            return i

        started = time.monotonic()
        results = [await windows.submit("post", lambda i=i: unit(i), [], f"post job 1 x{i}", {1: i}) for i in range(20)]
        assert results == list(range(20)) and done == list(range(20))
        assert time.monotonic() - started < 1.0  # the grace is paid once, not per unit
        assert windows.plain_units == 20
        await windows.close(timeout_s=0.1)
    assert caplog.text.count("Prefect record unavailable") == 2  # one line per worker, not per unit


async def test_a_window_takes_concurrent_units_and_counts_them():
    tallies: list[tuple[dict[str, Any], str]] = []
    windows: Windows

    async def window(number: int) -> None:
        tallies.append(await windows.serve(number, 0.5))

    windows = Windows("counting", window_s=0.5, open_window=window)
    attempts = {"n": 0}

    async def flaky_post() -> None:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise ConnectionResetError("reset")

    async def reserve() -> int:
        return 3

    await asyncio.gather(
        windows.submit("post", flaky_post, [0.0], "post job 7 x4, job 8 x2", {7: 4, 8: 2}),
        windows.submit("reserve", reserve, [], "reserve job 7 x3", {7: 3}),
    )
    await windows.close()
    (summary, message), = tallies
    assert windows.opened == 1 and windows.plain_units == 0
    assert summary["posts"] == 1 and summary["posted"] == 6 and summary["retries"] == 1
    assert summary["reservations"] == 1 and summary["reserved"] == 3
    assert summary["jobs"] == {"7": {"posted": 4, "asked": 3}, "8": {"posted": 2}}
    assert "job 7: " in message and "1 retries" in message


async def test_a_failed_unit_is_handed_back_to_the_worker_and_counted():
    """The worker settles a failed post itself: the window raises it into ``submit`` and counts it."""
    tallies: list[dict[str, Any]] = []
    windows: Windows

    async def window(number: int) -> None:
        tallies.append((await windows.serve(number, 0.2))[0])

    windows = Windows("failing", window_s=0.2, open_window=window)

    async def refused() -> None:
        raise ConnectionRefusedError(111, "refused")

    try:
        await windows.submit("post", refused, [0.0, 0.0], "post job 3 x5", {3: 5})
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("the post's failure must reach the worker")
    await windows.close()
    assert tallies == [{"window": 1, "seconds": tallies[0]["seconds"], "units": 1, "reservations": 0, "reserved": 0,
                        "posts": 1, "posted": 0, "retries": 2, "failed": 1, "jobs": {"3": {"post_failed": 5}}}]


async def test_units_after_a_window_closed_open_the_next_one():
    opened: list[int] = []
    windows: Windows

    async def window(number: int) -> None:
        opened.append(number)
        await windows.serve(number, 0.05)

    windows = Windows("rolling", window_s=0.05, open_window=window)

    async def post() -> None:
        return None

    for _ in range(3):
        await windows.submit("post", post, [], "post job 1 x1", {1: 1})
        await asyncio.sleep(0.15)  # the window's time is up: the next unit opens a new one
    await windows.close()
    assert opened == [1, 2, 3]


async def test_the_tally_and_labels():
    assert jobs_of_label("post job 1 x4, job 22 x3") == {1: 4, 22: 3}
    assert jobs_of_label("reserve") == {}

    async def nothing() -> None:
        return None

    reserve = Unit("reserve", nothing, [], "reserve job 5 x8", {5: 8})
    post = Unit("post", nothing, [], "post job 5 x2", {5: 2})
    tally = Tally()
    tally.add(reserve, 6, retries=1, failed=False)
    tally.add(post, None, retries=0, failed=False)
    tally.add(post, None, retries=3, failed=True)
    assert tally.summary(4, 1.23456) == {
        "window": 4, "seconds": 1.235, "units": 3, "reservations": 1, "reserved": 6, "posts": 2, "posted": 2,
        "retries": 4, "failed": 1, "jobs": {"5": {"asked": 8, "posted": 2, "post_failed": 2}},
    }
    assert tally.message() == ("1 reservation rounds (6 tasks), 2 posts (2 results), 4 retries, 1 failed; "
                               "job 5: asked 8 posted 2 post_failed 2")
