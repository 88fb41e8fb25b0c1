"""What the queue report reads, one source at a time; each works against the local API and the real Antenna.

- Antenna ``GET /jobs/?ids_only=1&incomplete_only=1`` (the workers' own query, every pipeline): which
  jobs are incomplete (:func:`incomplete_jobs`);
- Antenna ``GET /jobs/{id}/``: each job's size and answered images (:func:`job_details`);
- NATS JetStream, each job's consumer: msgs, pending, ack_pending, redelivered, redeliveries
  (:func:`consumer_stats`; NATS unreachable: no columns from it, and a line saying so);
- Prefect: the workers' per-job tables (who served a job, :func:`workers_by_job`) and the report's
  own previous table (the previous reading, :func:`previous_report`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from antenna_flows import artifact_keys
from antenna_flows.antenna_client import AntennaClient
from antenna_flows.jetstream import ConsumerStats, JobQueue, StreamGone
from antenna_flows.queue_report.rows import served_jobs, table_rows

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0
DETAIL_CONCURRENCY = 8


async def incomplete_jobs(api_url: str, token: str, timeout_s: float = 30.0) -> list[tuple[int, str | None]]:
    """(job id, pipeline slug) of every incomplete async job, as the workers query them."""
    client = AntennaClient(api_url, token, timeout_s=timeout_s, worker_name="queue-report")
    try:
        jobs = await client.list_jobs(None)
    finally:
        await client.aclose()
    return sorted({(j.id, j.pipeline_slug) for j in jobs})


async def job_details(api_url: str, token: str, job_ids: list[int], timeout_s: float = 30.0) -> dict[int, dict[str, Any]]:
    """``GET /jobs/{id}/`` of each job (a job that fails to answer is left out, with a log line)."""
    out: dict[int, dict[str, Any]] = {}
    limit = asyncio.Semaphore(DETAIL_CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=api_url.rstrip("/"), headers={"Authorization": f"Token {token}"}, timeout=timeout_s
    ) as http:

        async def one(job_id: int) -> None:
            async with limit:
                try:
                    response = await http.get(f"/jobs/{job_id}/")
                    response.raise_for_status()
                    out[job_id] = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning("Antenna %s: GET /jobs/%s/: %s", api_url, job_id, exc)

        await asyncio.gather(*(one(j) for j in job_ids))
    return out


async def consumer_stats(nats_url: str | None, job_ids: list[int]) -> tuple[dict[int, ConsumerStats], str | None]:
    """The consumer statistics of each job's stream: (stats, None), or ({}, why NATS could not be read)."""
    if not nats_url:  # a fleet on REST only: Antenna's job objects are all there is to read
        return {}, "no NATS URL configured (AMI_NATS_URL): queue columns from Antenna's job objects only"
    try:
        jobs = await asyncio.wait_for(JobQueue.connect(nats_url, name="queue-report"), STATS_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a report without NATS columns beats no report
        return {}, f"cannot reach NATS at {nats_url} ({type(exc).__name__}: {exc})"
    out: dict[int, ConsumerStats] = {}
    try:
        for job_id in job_ids:
            try:
                out[job_id] = await asyncio.wait_for(jobs.stats(job_id), STATS_TIMEOUT_S)
            except StreamGone:
                continue
            except Exception as exc:  # noqa: BLE001
                log.warning("NATS %s: stats of job %s: %s", nats_url, job_id, exc)
    finally:
        try:
            await asyncio.wait_for(jobs.close(), STATS_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
    return out, None


async def previous_report(client: Any) -> list[dict[str, Any]]:
    """The rows of the latest ``queue-report`` artifact ([] if none)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_keys.QUEUE_REPORT])),
        sort=ArtifactSort.CREATED_DESC,
        limit=1,
    )
    return table_rows(artifacts[0].data) if artifacts else []


async def workers_by_job(client: Any) -> dict[int, list[str]]:
    """Which workers served each job, from the latest ``worker-<name>-jobs`` table of every worker."""
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    served: dict[int, set[str]] = {}
    offset = 0
    while True:
        page = await client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(like_=artifact_keys.WORKER_TABLES_LIKE)),
            limit=200,
            offset=offset,
        )
        for artifact in page:
            match = artifact_keys.WORKER_TABLE.match(artifact.key or "")
            if not match:
                continue
            for job_id in served_jobs(table_rows(artifact.data)):
                served.setdefault(job_id, set()).add(match["name"])
        if len(page) < 200:
            break
        offset += 200
    return {job: sorted(names) for job, names in served.items()}
