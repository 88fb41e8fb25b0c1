"""Run one worker process: fair or drain, under Prefect or plain asyncio.

The CLI's ``worker`` command and the bench's worker processes both come here,
so what the bench measures is what operators run.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Literal

from antenna_flows.settings import DrainSettings, WorkerSettings

# Secrets never become flow-run parameters (the Prefect API stores parameters):
# they reach the flow through the environment of its process.
SECRET_FIELDS = {"antenna_api_token"}


def flow_overrides(settings: WorkerSettings) -> dict[str, Any]:
    return settings.model_dump(mode="json", exclude=SECRET_FIELDS | {"worker_name"})


def run_worker(
    settings: WorkerSettings,
    strategy: Literal["fair", "drain"] = "fair",
    orchestration: Literal["prefect", "plain"] = "prefect",
    drain: DrainSettings | None = None,
) -> dict[str, Any]:
    if orchestration == "prefect":
        os.environ["AMI_ANTENNA_API_TOKEN"] = settings.antenna_api_token
        if strategy == "drain":
            from flows.drain import drain_worker

            return asyncio.run(drain_worker(worker_name=settings.worker_name, settings_overrides=flow_overrides(settings)))
        from flows.worker import fair_worker

        return asyncio.run(fair_worker(worker_name=settings.worker_name, settings_overrides=flow_overrides(settings)))

    from antenna_flows.models import load_model

    model = load_model(settings)
    if strategy == "drain":
        from antenna_flows.drain import DrainWorker

        return asyncio.run(DrainWorker(settings, model, drain or DrainSettings()).run())
    from antenna_flows.worker import FairWorker

    return asyncio.run(FairWorker(settings, model).run())
