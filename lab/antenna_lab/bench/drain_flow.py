"""The upstream drain pattern as a flow, so the baseline is measured under the same orchestration.

One flow run per worker and nothing inside it: the upstream worker has no
unit of work finer than "drain this job".
"""

from __future__ import annotations

from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, get_run_logger

from antenna_lab.bench.drain import DrainWorker
from antenna_flows.models import load_model
from antenna_flows.settings import WorkerSettings
from antenna_lab.settings import DrainSettings


@flow(name="drain-worker", flow_run_name="{worker_name}", persist_result=False)
async def drain_worker(worker_name: str | None = None, settings_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Poll one random job, drain it with prefetching loaders, repeat (the upstream ``ami worker``)."""
    given = {"worker_name": worker_name, **(settings_overrides or {})}
    settings = WorkerSettings(**{k: v for k, v in given.items() if v is not None})
    worker = DrainWorker(settings, load_model(settings), DrainSettings())
    totals = await worker.run()
    get_run_logger().info("drain worker %s stopped: %s", settings.worker_name, totals)
    return totals
