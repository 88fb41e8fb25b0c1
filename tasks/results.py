"""Posting a batch's results to Antenna, as a Prefect task with exponential backoff and jitter.

The posting function is idempotent (it remembers a success), so a retry after
a lost response never posts twice.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.retry import retryable


@task(
    name="post-results",
    task_run_name="{label}",
    retries=4,
    retry_delay_seconds=[0.5, 1, 2, 4],
    retry_jitter_factor=0.5,
    retry_condition_fn=retryable,
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def post_results(post: Callable[[], Awaitable[None]], label: str) -> None:
    await post()
