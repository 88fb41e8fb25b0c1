"""The fleet-wide view: one table of every incomplete Antenna job, refreshed every minute.

    queue-report (scheduled every minute in prefect.yaml)
    ├── artifact: queue-report          one row per incomplete job: msgs, pending, ack_pending,
    │                                   redelivered, redeliveries, results, errors, progress %,
    │                                   images/s since the previous report, ETA, workers that served it
    └── artifact: job-<id>-progress     one progress artifact per incomplete job (a new version each
                                        run; the Artifacts page shows the latest), and a last one at
                                        100 % (or where it stopped) for each job that left the list

Images/s compares each job's answered images with the previous ``queue-report`` artifact (the previous
reading, ~1 minute earlier), so the report keeps no state of its own. Where the data comes from:
antenna_flows/queue_report/readers.py; how it becomes rows: antenna_flows/queue_report/rows.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client

from antenna_flows.orchestration.runs import read_secret
from antenna_flows.queue_report import readers, rows as report
from antenna_flows.settings import WorkerSettings
from antenna_flows.tasks.artifacts import publish_job_progress, publish_queue_report


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
        given["antenna_api_token"] = await read_secret(token_secret_block)
    settings = WorkerSettings(**{k: v for k, v in given.items() if v is not None})
    url, token, timeout = settings.antenna_api_url, settings.antenna_api_token, settings.http_timeout_s

    # Read: Antenna's incomplete jobs and their counts, their NATS consumers, the last report and the workers' tables.
    jobs = await readers.incomplete_jobs(url, token, timeout)
    ids = [job_id for job_id, _ in jobs]
    details = await readers.job_details(url, token, ids, timeout)
    stats, nats_problem = await readers.consumer_stats(settings.nats_url, ids)
    if nats_problem:
        logger.warning("%s: queue columns from Antenna's job objects where it has them", nats_problem)
    now = dt.datetime.now(dt.timezone.utc)
    async with get_client() as client:
        previous = await readers.previous_report(client)
        served = await readers.workers_by_job(client)

    # Write: the table, a progress bar per job, and a last one for each job that finished since.
    rows = report.build_rows(now, jobs, details, stats, previous, served)
    await publish_queue_report(rows, report.report_description(now, rows, nats_problem), report.iso_time(now))
    finished = []
    if progress_artifacts:
        for row in rows:
            pct = row.get("progress_pct")
            await publish_job_progress(row["job_id"], pct if pct is not None else 0.0, report.progress_description(row))
        gone = report.jobs_gone(previous, ids)
        for job_id, detail in (await readers.job_details(url, token, gone, timeout)).items():
            pct, description = report.final_progress(report.job_counts(job_id, detail), now)
            await publish_job_progress(job_id, pct, description)
            finished.append(job_id)
    logger.info("queue report: %d incomplete jobs, %d finished since the last report", len(rows), len(finished))
    return {"jobs": len(rows), "finished": finished, "images_per_s": round(report.total_rate(rows), 3),
            "nats": nats_problem is None}
