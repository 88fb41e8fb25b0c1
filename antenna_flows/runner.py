"""Run one fair worker process, under Prefect or plain asyncio.

The CLI's ``worker`` command and the bench's worker processes both come here,
so what the bench measures is what operators run.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Literal

from antenna_flows.settings import WorkerSettings

# Secrets never become flow-run parameters (the Prefect API stores parameters):
# they reach the flow through the environment of its process.
SECRET_FIELDS = {"antenna_api_token"}


def flow_overrides(settings: WorkerSettings) -> dict[str, Any]:
    return settings.model_dump(mode="json", exclude=SECRET_FIELDS | {"worker_name"})


def run_worker(settings: WorkerSettings, orchestration: Literal["prefect", "plain"] = "prefect") -> dict[str, Any]:
    if orchestration == "prefect":
        os.environ["AMI_ANTENNA_API_TOKEN"] = settings.antenna_api_token
        from antenna_flows.flows.worker import fair_worker
        from antenna_flows.orchestration.server import prefect_api

        with prefect_api():  # no PREFECT_API_URL: a temporary server that outlives the run (its final report)
            return asyncio.run(fair_worker(worker_name=settings.worker_name, settings_overrides=flow_overrides(settings)))

    from antenna_flows.models import load_model
    from antenna_flows.worker import FairWorker

    return asyncio.run(FairWorker(settings, load_model(settings)).run())
