"""Where the fleet keeper's entry point was: deployments made before the rename still name this file.

``prefect --no-prompt deploy --all`` points the ``fleet-keeper`` deployment at
``flows/fleet_keeper.py``; until an operator redeploys, runs of the old deployment load this file
and get the same flow. Delete it once no deployment names ``flows/fleet.py:fleet_keeper``.
"""

from antenna_flows.flows.fleet_keeper import fleet_keeper

__all__ = ["fleet_keeper"]
