"""``serve-window``: the one Prefect task, a window of a worker's reservation rounds and result posts.

One task run per ``window_s`` of steady work (none while idle), every unit inside it retried on
its own; its Completed state's message counts what it did per job. What a window does:
:mod:`antenna_flows.orchestration.windows`.
"""

from __future__ import annotations

from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from antenna_flows.orchestration.windows import WINDOWS


@task(
    name="serve-window",
    task_run_name="{worker}-window-{number}",
    retries=0,  # each unit inside retries on its own
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def serve_window(worker: str, number: int, seconds: float) -> Any:
    """Every reservation round and result post of ``worker`` for up to ``seconds``; counts per job, retries."""
    summary, message = await WINDOWS[worker].serve(number, seconds)
    return Completed(message=message, data=summary)
