"""A flow run around a worker: its settings from the run's parameters, how it ends, what starts after it.

- Settings: the run's parameters over the host's environment (``AMI_*``, ``.env``). The API token
  is never a parameter (the Prefect API stores parameters): it comes from the host's environment
  or from the Prefect Secret block the run names.
- The end: a run stopped by a cancel from the UI ends Cancelled (its batch posted, the rest
  released); one that reached ``max_runtime_s`` starts the next run of its deployment with the same
  parameters (rollover), unless it is a fleet slot's run, whose next one the fleet keeper starts.
"""

from __future__ import annotations

import logging
from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect.context import FlowRunContext
from prefect.states import Cancelled

from antenna_flows.fleet.spec import FLEET_TAG
from antenna_flows.orchestration.stopping import cancel_requested
from antenna_flows.settings import WorkerSettings


async def read_secret(block_name: str) -> str:
    """The value of a Prefect Secret block (the API token of a deployment that names one)."""
    from prefect.blocks.system import Secret

    return str((await Secret.aload(block_name)).get())


async def worker_settings(given: dict[str, Any], token_secret_block: str | None = None) -> WorkerSettings:
    """Settings from the parameters given (``None``: unset, from the environment), the token from a Secret block."""
    if token_secret_block:
        given = {"antenna_api_token": await read_secret(token_secret_block), **given}
    return WorkerSettings(**{k: v for k, v in given.items() if v is not None})


def quiet_task_run_logs() -> None:
    """Task runs' state changes are in the UI already; a log line each would double the API traffic."""
    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)


async def finish_run(stop_reason: str, totals: dict[str, Any], rollover: bool, logger: Any) -> Any:
    """What the worker's flow run returns: its totals, or Cancelled when the UI asked; rolls over at max_runtime_s."""
    run_context = FlowRunContext.get()
    flow_run = run_context.flow_run if run_context else None
    if stop_reason.startswith("SIGTERM") and flow_run is not None and await cancel_requested(flow_run.id):
        return Cancelled(message=f"cancelled: batch in flight posted, the rest released; {totals}", data=totals)
    if rollover and stop_reason.startswith("max_runtime_s") and flow_run is not None and flow_run.deployment_id:
        await roll_over(flow_run, logger)
    return totals


async def roll_over(flow_run: Any, logger: Any) -> None:
    """``max_runtime_s`` reached: start the next run of this deployment with the same parameters.

    Not for a fleet slot's run (tag ``fleet``): the fleet keeper starts the next one when this
    one Completes (:mod:`antenna_flows.fleet.keeper`), and two would compete for the slot.
    """
    from prefect.deployments import run_deployment

    if FLEET_TAG in (flow_run.tags or []):
        logger.info("rollover: the fleet keeper starts this slot's next run")
        return
    try:
        nxt = await run_deployment(flow_run.deployment_id, parameters=dict(flow_run.parameters), timeout=0,
                                   as_subflow=False, tags=list(flow_run.tags or []),
                                   work_queue_name=flow_run.work_queue_name, flow_run_name=flow_run.name)
        logger.info("rolled over: next run %s (%s) takes over", nxt.name, nxt.id)
    except Exception as exc:  # noqa: BLE001
        logger.error("rollover failed: could not start the next run: %r", exc)
