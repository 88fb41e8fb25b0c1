"""The fleet-wide view: one table of every incomplete Antenna job, refreshed every minute.

    queue-report (scheduled every minute in prefect.yaml)
    ├── artifact: queue-report          one row per incomplete job: msgs, pending, ack_pending,
    │                                   redelivered, redeliveries, results, errors, progress %,
    │                                   images/s since the previous report, ETA, workers that served it
    └── artifact: job-<id>-progress     one progress artifact per incomplete job (a new version each
                                        run; the Artifacts page shows the latest), and a last one at
                                        100 % (or where it stopped) for each job that left the list

Images/s compares each job's answered images with the previous ``queue-report`` artifact (the previous
reading, ~1 minute earlier), so the report keeps no state of its own. Where the data comes from and how
the local API's and the real Antenna's job objects are both read: tasks/queue_stats.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, get_run_logger
from prefect.artifacts import acreate_progress_artifact, acreate_table_artifact
from prefect.client.orchestration import get_client

from antenna_flows.settings import WorkerSettings
from antenna_flows.tasks.queue_stats import (
    REPORT_KEY,
    build_rows,
    incomplete_jobs,
    job_counts,
    job_details,
    previous_report,
    progress_description,
    progress_key,
    queue_stats,
    workers_by_job,
    iso_time,
)


async def _secret(block_name: str) -> str:
    from prefect.blocks.system import Secret

    return str((await Secret.aload(block_name)).get())


@flow(name="queue-report", persist_result=False)
async def queue_report(
    antenna_api_url: str | None = None,
    nats_url: str | None = None,
    token_secret_block: str | None = None,
    progress_artifacts: bool = True,
) -> dict[str, Any]:
    """Write the ``queue-report`` table (every incomplete job) and a progress artifact per job.

    Unset parameters come from the environment (``AMI_ANTENNA_API_URL``, ``AMI_NATS_URL``,
    ``AMI_ANTENNA_API_TOKEN``), as for the workers; the token is never a parameter.
    """
    logger = get_run_logger()
    given = {"antenna_api_url": antenna_api_url, "nats_url": nats_url}
    if token_secret_block:
        given["antenna_api_token"] = await _secret(token_secret_block)
    settings = WorkerSettings(**{k: v for k, v in given.items() if v is not None})
    url, token = settings.antenna_api_url, settings.antenna_api_token

    jobs = await incomplete_jobs(url, token, settings.http_timeout_s)
    ids = [job_id for job_id, _ in jobs]
    details = await job_details(url, token, ids, settings.http_timeout_s)
    stats, nats_problem = await queue_stats(settings.nats_url, ids)
    if nats_problem:
        logger.warning("%s: queue columns from Antenna's job objects where it has them", nats_problem)
    now = dt.datetime.now(dt.timezone.utc)
    async with get_client() as client:
        previous = await previous_report(client)
        served = await workers_by_job(client)
    rows = build_rows(now, jobs, details, stats, previous, served)

    active = sum(1 for r in rows if (r.get("images_per_s_1m") or 0) > 0)
    rate = sum(r.get("images_per_s_1m") or 0 for r in rows)
    description = (
        f"**Queue** at {now:%Y-%m-%d %H:%M:%S} UTC: {len(rows)} incomplete jobs, {active} progressing, "
        f"{rate:.2f} images/s in all since the previous report; "
        f"{sum(r.get('pending') or 0 for r in rows)} images pending, "
        f"{sum(r.get('ack_pending') or 0 for r in rows)} reserved (ack_pending)"
        + (f". {nats_problem}" if nats_problem else ".")
    )
    await acreate_table_artifact(
        key=REPORT_KEY,
        table=rows or [{"job_id": None, "read_at": iso_time(now)}],
        description=description,
    )

    finished = []
    if progress_artifacts:
        for row in rows:
            pct = row.get("progress_pct")
            await acreate_progress_artifact(
                progress=float(pct if pct is not None else 0.0),
                key=progress_key(row["job_id"]),
                description=progress_description(row),
            )
        # Jobs that left the list since the last report: one last progress artifact, where they ended.
        gone = sorted({int(r["job_id"]) for r in previous if r.get("job_id") is not None} - set(ids))
        for job_id, detail in (await job_details(url, token, gone, settings.http_timeout_s)).items():
            counts = job_counts(job_id, detail)
            total, done = counts.total, counts.processed
            pct = 100.0 * done / total if total and done is not None else 100.0
            await acreate_progress_artifact(
                progress=pct,
                key=progress_key(job_id),
                description=f"**job {job_id}** ({counts.pipeline or '?'}): {counts.status or 'finished'}, "
                f"{done if done is not None else '?'} of {total or '?'} images, {counts.errors or 0} errors "
                f"(as of {iso_time(now)}).",
            )
            finished.append(job_id)
    logger.info("queue report: %d incomplete jobs, %d finished since the last report", len(rows), len(finished))
    return {"jobs": len(rows), "finished": finished, "images_per_s": round(rate, 3), "nats": nats_problem is None}
