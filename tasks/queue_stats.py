"""What the fleet-wide queue report reads, and how it turns readings into rows (flows/queue_report.py).

Sources, all of which work against the local API and the real Antenna alike:

- Antenna ``GET /jobs/?ids_only=1&incomplete_only=1`` (the worker's own query, every pipeline): which
  jobs are incomplete;
- Antenna ``GET /jobs/{id}/``: the job's size and how many images got a result or an error. The local
  API answers ``total``/``results``/``errors``; the real Antenna answers ``progress.stages[]`` whose
  ``process`` stage has ``processed``/``remaining``/``failed`` params (ami/jobs/tasks.py
  ``_update_job_progress``): both are read (:func:`job_counts`);
- NATS JetStream, the job's consumer: msgs, pending, ack_pending, redelivered (the field report's
  columns) and cumulative redeliveries;
- Prefect: the workers' per-job table artifacts ``worker-<name>-jobs`` (which workers served a job),
  and this report's previous artifact (the previous reading, for images/s and the ETA).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx

from antenna_flows.antenna_client import AntennaClient
from antenna_flows.jetstream import ConsumerStats, JobQueue, StreamGone

log = logging.getLogger(__name__)

REPORT_KEY = "queue-report"
WORKER_KEY = re.compile(r"^worker-(?P<name>[a-z0-9-]+)-jobs$")
STATS_TIMEOUT_S = 5.0
DETAIL_CONCURRENCY = 8


def progress_key(job_id: int) -> str:
    return f"job-{job_id}-progress"


@dataclass
class JobCounts:
    """A job as Antenna tells it: size, images answered (result or error), status."""

    job_id: int
    pipeline: str | None = None
    status: str | None = None
    total: int | None = None
    results: int | None = None
    errors: int | None = None
    name: str | None = None

    @property
    def processed(self) -> int | None:
        if self.results is None and self.errors is None:
            return None
        return (self.results or 0) + (self.errors or 0)


def _int(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(float(value))
    except (TypeError, ValueError):
        return None


def _stage_params(stage: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for param in stage.get("params") or []:
        if isinstance(param, dict):
            key = str(param.get("key") or param.get("name") or "").strip().lower()
            out[key] = param.get("value")
    return out


def job_counts(job_id: int, detail: dict[str, Any] | None, pipeline: str | None = None) -> JobCounts:
    """Read a ``GET /jobs/{id}/`` answer of the local API or of the real Antenna (missing fields: None)."""
    counts = JobCounts(job_id=job_id, pipeline=pipeline)
    if not isinstance(detail, dict):
        return counts
    counts.name = detail.get("name")
    pipe = detail.get("pipeline_slug") or detail.get("pipeline")
    if isinstance(pipe, dict):
        pipe = pipe.get("slug") or pipe.get("name")
    counts.pipeline = str(pipe) if pipe else pipeline
    status = detail.get("status")
    if isinstance(status, dict):
        status = status.get("value") or status.get("name")
    counts.status = str(status) if status else None
    if "total" in detail or "results" in detail:  # the local API
        counts.total = _int(detail.get("total"))
        counts.results = _int(detail.get("results"))
        counts.errors = _int(detail.get("errors"))
        return counts
    progress = detail.get("progress")
    if isinstance(progress, dict):  # the real Antenna: stages with params
        if not counts.status and isinstance(progress.get("summary"), dict):
            counts.status = progress["summary"].get("status")
        for stage in progress.get("stages") or []:
            if isinstance(stage, dict) and str(stage.get("key", "")).lower() == "process":
                params = _stage_params(stage)
                processed = _int(params.get("processed"))
                remaining = _int(params.get("remaining"))
                failed = _int(params.get("failed"))
                if processed is not None:
                    counts.errors = failed or 0
                    counts.results = max(0, processed - (failed or 0))
                    if remaining is not None:
                        counts.total = processed + remaining
    return counts


async def incomplete_jobs(api_url: str, token: str, timeout_s: float = 30.0) -> list[tuple[int, str | None]]:
    """(job id, pipeline slug) of every incomplete async job, as the workers query them."""
    client = AntennaClient(api_url, token, timeout_s=timeout_s, worker_name="queue-report")
    try:
        jobs = await client.list_jobs(None)
    finally:
        await client.aclose()
    return sorted({(j.id, j.pipeline_slug) for j in jobs})


async def job_details(api_url: str, token: str, job_ids: list[int], timeout_s: float = 30.0) -> dict[int, dict[str, Any]]:
    """``GET /jobs/{id}/`` of each job (a job that fails to answer is left out)."""
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
                    log.warning("GET /jobs/%s/: %s", job_id, exc)

        await asyncio.gather(*(one(j) for j in job_ids))
    return out


async def queue_stats(nats_url: str, job_ids: list[int]) -> tuple[dict[int, ConsumerStats], str | None]:
    """The consumer statistics of each job's stream; (stats, None) or ({}, why NATS could not be read)."""
    try:
        queue = await asyncio.wait_for(
            JobQueue.connect(nats_url, name="queue-report"), STATS_TIMEOUT_S
        )
    except Exception as exc:  # noqa: BLE001 - a report without NATS columns beats no report
        return {}, f"NATS {nats_url} unreachable: {type(exc).__name__}: {exc}"
    out: dict[int, ConsumerStats] = {}
    try:
        for job_id in job_ids:
            try:
                out[job_id] = await asyncio.wait_for(queue.stats(job_id), STATS_TIMEOUT_S)
            except StreamGone:
                continue
            except Exception as exc:  # noqa: BLE001
                log.warning("stats of job %s: %s", job_id, exc)
    finally:
        try:
            await asyncio.wait_for(queue.close(), STATS_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
    return out, None


def table_rows(data: Any) -> list[dict[str, Any]]:
    """A table artifact's data as a list of row dicts (stored as JSON text or as a list)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            return []
    if isinstance(data, dict) and "data" in data and "columns" in data:  # column-oriented
        return [dict(zip(data["columns"], row)) for row in data["data"]]
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


async def previous_report(client: Any) -> list[dict[str, Any]]:
    """The rows of the latest ``queue-report`` artifact ([] if none)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_KEY])),
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
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(like_="worker-%-jobs")),
            limit=200,
            offset=offset,
        )
        for artifact in page:
            match = WORKER_KEY.match(artifact.key or "")
            if not match:
                continue
            for row in table_rows(artifact.data):
                job_id = _int(row.get("job_id"))
                if job_id is not None and ((_int(row.get("images")) or 0) + (_int(row.get("errors")) or 0)) > 0:
                    served.setdefault(job_id, set()).add(match["name"])
        if len(page) < 200:
            break
        offset += 200
    return {job: sorted(names) for job, names in served.items()}


def iso_time(ts: dt.datetime) -> str:
    """UTC, to the millisecond: the report's ``read_at`` (the next report's rate is measured from it)."""
    return ts.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: Any) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{m:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def build_rows(
    now: dt.datetime,
    jobs: list[tuple[int, str | None]],
    details: dict[int, dict[str, Any]],
    stats: dict[int, ConsumerStats],
    previous: list[dict[str, Any]],
    served: dict[int, list[str]],
) -> list[dict[str, Any]]:
    """One row per incomplete job: the field report's columns, progress, images/s since the last reading, ETA."""
    before = {
        _int(r.get("job_id")): (parse_time(r.get("read_at")), _int(r.get("processed"))) for r in previous if r.get("job_id") is not None
    }
    rows = []
    for job_id, pipeline in jobs:
        detail = details.get(job_id)
        counts = job_counts(job_id, detail, pipeline)
        s = stats.get(job_id)
        total = counts.total if counts.total is not None else (s.messages if s else None)
        if total is None and detail:
            total = _int(detail.get("messages"))
        processed = counts.processed
        rate: float | None = None
        prev_at, prev_processed = before.get(job_id, (None, None))
        if processed is not None and prev_at is not None and prev_processed is not None:
            elapsed = (now - prev_at).total_seconds()
            if elapsed > 1:
                rate = max(0.0, (processed - prev_processed) / elapsed)
        remaining = max(0, total - processed) if total is not None and processed is not None else None
        eta_s = remaining / rate if rate and remaining is not None else (0.0 if remaining == 0 else None)

        def queue_field(name: str) -> int | None:
            if s is not None:
                return int(getattr(s, name))
            return _int(detail.get(name)) if isinstance(detail, dict) else None  # local API: sampled stats

        rows.append(
            {  # column order is the UI's: what an operator reads first, then the field report's columns
                "job_id": job_id,
                "pipeline": counts.pipeline,
                "status": counts.status,
                "progress_pct": round(100.0 * processed / total, 1) if total and processed is not None else None,
                "images_per_s_1m": None if rate is None else round(rate, 3),
                "eta": human_duration(eta_s),
                "workers": ", ".join(served.get(job_id, [])),
                "msgs": queue_field("messages"),
                "pending": queue_field("pending"),
                "ack_pending": queue_field("ack_pending"),
                "redelivered": queue_field("redelivered"),
                "redeliveries": queue_field("redeliveries"),
                "results": counts.results,
                "errors": counts.errors,
                "processed": processed,
                "total": total,
                "eta_s": None if eta_s is None else round(eta_s, 1),
                "read_at": iso_time(now),
            }
        )
    return rows


def progress_description(row: dict[str, Any]) -> str:
    rate = row.get("images_per_s_1m")
    parts = [
        f"**job {row['job_id']}** ({row.get('pipeline') or '?'}, {row.get('status') or '?'}): "
        f"{row.get('processed') if row.get('processed') is not None else '?'} of {row.get('total') or '?'} images",
        f"{row.get('errors') or 0} errors",
        f"{rate} images/s" if rate is not None else "images/s: next reading",
    ]
    if row.get("eta"):
        parts.append(f"ETA {row['eta']}")
    if row.get("workers"):
        parts.append(f"workers: {row['workers']}")
    return ", ".join(parts) + f" (as of {row.get('read_at')})."
