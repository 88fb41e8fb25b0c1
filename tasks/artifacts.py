"""What the flows write to Prefect's Artifacts page: tables and progress bars (keys: antenna_flows.artifact_keys).

- ``worker-<name>-jobs``: a worker's per-job throughput (every few minutes and at its end);
- ``fleet``: the keeper's last pass, one row per slot;
- ``queue-report``: every incomplete job; ``job-<id>-progress``: a progress bar per job.
"""

from __future__ import annotations

from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect.artifacts import acreate_progress_artifact, acreate_table_artifact

from antenna_flows import artifact_keys


def describe_worker(worker: str, totals: dict[str, Any], final: bool) -> str:
    state = "final" if final else "running"
    return (
        f"**{worker}** ({state}): {totals.get('images', 0)} images, {totals.get('errors', 0)} error results "
        f"in {totals.get('batches', 0)} batches; slot busy {totals.get('slot_busy_s', 0)} s of "
        f"{totals.get('uptime_s', 0)} s ({100 * float(totals.get('slot_utilisation', 0)):.1f}%), "
        f"{totals.get('images_per_s', 0)} images/s."
    )


async def publish_job_table(worker: str, rows: list[dict[str, Any]], totals: dict[str, Any], final: bool) -> None:
    """A worker's per-job table (images, GPU seconds, share, throughput per job)."""
    await acreate_table_artifact(
        key=artifact_keys.worker_table(worker), table=rows or [{"job_id": None}],
        description=describe_worker(worker, totals, final),
    )


async def publish_fleet_table(rows: list[dict[str, Any]], source: str, totals: dict[str, int], dry_run: bool) -> None:
    """The keeper's pass: one row per slot (run, state, heartbeat age, what it did)."""
    description = (
        f"**Fleet** ({source}): {totals['slots']} slots; this pass started {totals['started']}, "
        f"marked {totals['marked_crashed']} Crashed, cancelled {totals['cancelled_duplicates']} duplicates"
        + (f", {totals['errors']} errors" if totals["errors"] else "")
        + (" (dry run)" if dry_run else "")
        + "."
    )
    await acreate_table_artifact(key=artifact_keys.FLEET, table=rows or [{"slot": None}], description=description)


async def publish_queue_report(rows: list[dict[str, Any]], description: str, read_at: str) -> None:
    """The fleet-wide table, one row per incomplete job."""
    await acreate_table_artifact(key=artifact_keys.QUEUE_REPORT, table=rows or [{"job_id": None, "read_at": read_at}],
                                 description=description)


async def publish_job_progress(job_id: int, percent: float, description: str) -> None:
    """A job's progress bar (a new version each report; the Artifacts page shows the latest)."""
    await acreate_progress_artifact(progress=float(percent), key=artifact_keys.job_progress(job_id), description=description)
