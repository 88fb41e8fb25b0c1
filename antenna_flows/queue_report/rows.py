"""How the queue report turns readings into rows and words (pure: no I/O).

A job's counts come from Antenna's job object, which the local API and the real Antenna shape
differently (:func:`job_counts` reads both); its queue columns from the job's NATS consumer (the
field report's columns: msgs, pending, ack_pending, redelivered) or, where NATS could not be read,
from the job object when it carries them. Images/s compares each job's answered images with the
previous report's reading (its ``read_at`` and ``processed``), so the report keeps no state of its own.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from antenna_flows.jetstream import ConsumerStats


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
    """Read a ``GET /jobs/{id}/`` answer of the local API or of the real Antenna (missing fields: None).

    The local API answers ``total``/``results``/``errors``; the real Antenna answers
    ``progress.stages[]`` whose ``process`` stage has ``processed``/``remaining``/``failed`` params
    (ami/jobs/tasks.py ``_update_job_progress``).
    """
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


def served_jobs(rows: list[dict[str, Any]]) -> set[int]:
    """The jobs a worker's table says it answered at least one image of."""
    served = set()
    for row in rows:
        job_id = _int(row.get("job_id"))
        if job_id is not None and ((_int(row.get("images")) or 0) + (_int(row.get("errors")) or 0)) > 0:
            served.add(job_id)
    return served


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

        def consumer_field(name: str) -> int | None:
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
                "msgs": consumer_field("messages"),
                "pending": consumer_field("pending"),
                "ack_pending": consumer_field("ack_pending"),
                "redelivered": consumer_field("redelivered"),
                "redeliveries": consumer_field("redeliveries"),
                "results": counts.results,
                "errors": counts.errors,
                "processed": processed,
                "total": total,
                "eta_s": None if eta_s is None else round(eta_s, 1),
                "read_at": iso_time(now),
            }
        )
    return rows


def report_description(now: dt.datetime, rows: list[dict[str, Any]], nats_problem: str | None) -> str:
    """The table's headline: jobs, how many progress, images/s in all, images waiting and reserved."""
    active = sum(1 for r in rows if (r.get("images_per_s_1m") or 0) > 0)
    return (
        f"**Queue** at {now:%Y-%m-%d %H:%M:%S} UTC: {len(rows)} incomplete jobs, {active} progressing, "
        f"{total_rate(rows):.2f} images/s in all since the previous report; "
        f"{sum(r.get('pending') or 0 for r in rows)} images pending, "
        f"{sum(r.get('ack_pending') or 0 for r in rows)} reserved (ack_pending)"
        + (f". {nats_problem}" if nats_problem else ".")
    )


def total_rate(rows: list[dict[str, Any]]) -> float:
    return sum(r.get("images_per_s_1m") or 0 for r in rows)


def progress_description(row: dict[str, Any]) -> str:
    """The words under a job's progress bar while it is incomplete."""
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


def final_progress(counts: JobCounts, now: dt.datetime) -> tuple[float, str]:
    """A job that left the incomplete list: its last progress (100 % unless it stopped short) and words."""
    total, done = counts.total, counts.processed
    pct = 100.0 * done / total if total and done is not None else 100.0
    return pct, (f"**job {counts.job_id}** ({counts.pipeline or '?'}): {counts.status or 'finished'}, "
                 f"{done if done is not None else '?'} of {total or '?'} images, {counts.errors or 0} errors "
                 f"(as of {iso_time(now)}).")


def jobs_gone(previous: list[dict[str, Any]], incomplete: list[int]) -> list[int]:
    """Jobs in the previous report that are no longer incomplete."""
    return sorted({int(r["job_id"]) for r in previous if r.get("job_id") is not None} - set(incomplete))
