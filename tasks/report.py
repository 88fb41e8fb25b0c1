"""Per-job throughput as Prefect table artifacts (the Artifacts page, one key per worker)."""

from __future__ import annotations

import re
from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect.artifacts import acreate_table_artifact


def artifact_key(worker: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "worker-" + (re.sub(r"[^a-z0-9-]+", "-", worker.lower()).strip("-") or "unnamed") + "-jobs"


def describe(worker: str, totals: dict[str, Any], final: bool) -> str:
    state = "final" if final else "running"
    return (
        f"**{worker}** ({state}): {totals.get('images', 0)} images, {totals.get('errors', 0)} error results "
        f"in {totals.get('batches', 0)} batches; slot busy {totals.get('slot_busy_s', 0)} s of "
        f"{totals.get('uptime_s', 0)} s ({100 * float(totals.get('slot_utilisation', 0)):.1f}%), "
        f"{totals.get('images_per_s', 0)} images/s."
    )


async def publish_job_table(worker: str, rows: list[dict[str, Any]], totals: dict[str, Any], final: bool) -> None:
    await acreate_table_artifact(
        key=artifact_key(worker), table=rows or [{"job_id": None}], description=describe(worker, totals, final)
    )
