"""The fleet keeper: one fair-worker run per GPU slot of the fleet spec, kept alive by Prefect itself.

    fleet-keeper (scheduled every 30 s, and run at once when a fleet run Crashes, Fails or Completes:
    │             the deployment's trigger in prefect.yaml)
    ├── reads deployments/fleet.yaml (or $ANTENNA_FLEET_SPEC, or the ``spec`` parameter)
    ├── per slot: its Prefect work queue (concurrency 1); a Running run without heartbeats -> Crashed;
    │   no live run -> run_deployment(<slot's deployment>, timeout=0) on that Prefect work queue
    └── artifact: fleet (one row per slot: run, state, heartbeat age, what the keeper did)

A killed flow-run process is marked Crashed by its Prefect worker; the trigger runs the keeper at once
and the scheduled runs catch anything the trigger missed. What a pass does: antenna_flows/fleet/keeper.py.
"""

from __future__ import annotations

from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client

from antenna_flows.fleet.keeper import keep_fleet
from antenna_flows.fleet.spec import load_fleet
from antenna_flows.tasks.artifacts import publish_fleet_table


@flow(name="fleet-keeper", persist_result=False, log_prints=False)
async def fleet_keeper(spec: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Start a fair-worker run for every slot of the fleet spec that has none alive; mark dead ones Crashed.

    ``spec``: a fleet spec file (default ``$ANTENNA_FLEET_SPEC``, else deployments/fleet.yaml).
    ``dry_run``: report what would be done, change nothing.
    """
    logger = get_run_logger()
    fleet = load_fleet(spec)
    async with get_client() as client:
        result = await keep_fleet(client, fleet, dry_run=dry_run)
    totals = result.totals()
    await publish_fleet_table([s.row() for s in result.slots], fleet.source, totals, dry_run)
    for slot in result.slots:
        if slot.action != "ok" or slot.detail:
            logger.info("%s: %s %s %s", slot.slot, slot.action, slot.run, slot.detail)
    logger.info("fleet: %s", totals)
    return totals
