"""Reserving tasks from job queues, as a Prefect task with retries.

One task run per reservation round (a few jobs, a handful of tasks each),
never per image. It returns only a count: the reservations go straight into
the worker's pool, so a long-running flow keeps no per-call result in memory.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.retry import retryable


@task(
    name="reserve-tasks",
    task_run_name="reserve {wants}",
    retries=3,
    retry_delay_seconds=[0.1, 0.2, 0.4],
    retry_jitter_factor=0.5,
    retry_condition_fn=retryable,
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def reserve_tasks(reserve: Callable[[dict[int, int]], Awaitable[int]], wants: dict[int, int]) -> int:
    """Reserve ``wants[job]`` tasks from each job's queue; returns how many were reserved."""
    return await reserve(wants)
