"""The fleet keeper: one fair-worker run per GPU slot of the fleet spec, kept alive by Prefect itself.

    fleet-keeper (scheduled every 30 s, and run at once when a fleet run Crashes, Fails or Completes:
    │             the deployment's trigger in prefect.yaml)
    ├── reads deployments/fleet.yaml (or $ANTENNA_FLEET_SPEC, or the ``spec`` parameter)
    ├── per slot: its work queue (concurrency 1); a Running run without heartbeats -> Crashed;
    │   no live run -> run_deployment(<slot's deployment>, timeout=0) on the slot's queue
    └── artifact: fleet (one row per slot: run, state, heartbeat age, what the keeper did)

A killed flow-run process is marked Crashed by its Prefect worker; the trigger runs the keeper at once
and the scheduled runs catch anything the trigger missed. What a pass does: tasks/fleet.py.
"""

from __future__ import annotations

from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact
from prefect.client.orchestration import get_client

from antenna_flows.deployments.fleet import load_fleet
from antenna_flows.tasks.fleet import keep_fleet

ARTIFACT_KEY = "fleet"


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
    rows = [s.row() for s in result.slots] or [{"slot": None}]
    description = (
        f"**Fleet** ({fleet.source}): {totals['slots']} slots; this pass started {totals['started']}, "
        f"marked {totals['marked_crashed']} Crashed, cancelled {totals['cancelled_duplicates']} duplicates"
        + (f", {totals['errors']} errors" if totals["errors"] else "")
        + (" (dry run)" if dry_run else "")
        + "."
    )
    await acreate_table_artifact(key=ARTIFACT_KEY, table=rows, description=description)
    for slot in result.slots:
        if slot.action != "ok" or slot.detail:
            logger.info("%s: %s %s %s", slot.slot, slot.action, slot.run, slot.detail)
    logger.info("fleet: %s", totals)
    return totals
