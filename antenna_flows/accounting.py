"""What a worker did, per job: the numbers behind its Prefect artifacts and the demo table.

Pure bookkeeping (no I/O): the worker records events, readers take snapshots.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class JobLedger:
    job_id: int
    pipeline: str = ""
    priority: int = 0
    reserved: int = 0
    images: int = 0  # successful results posted (accepted by Antenna)
    errors: int = 0  # error results posted
    slot_s: float = 0.0  # this job's measured share of inference-slot seconds
    batches: int = 0
    redelivered: int = 0  # deliveries we received with num_delivered > 1
    reanswered: int = 0  # redeliveries of images this worker had answered (Antenna's save failed): answered again
    recomputed: int = 0  # of those, answers no longer remembered, so computed again
    released: int = 0  # handed back with nak (stop, outage)
    dropped: int = 0  # discarded because the job's stream vanished (completed or cancelled)
    terminated: int = 0  # poison tasks Antenna accepts no answer for (term: never redelivered)
    saved: int = 0  # redeliveries held while Antenna's late save of the earlier answer acked them (not answered twice)
    posts: int = 0  # result posts made for this job (requests to Antenna)
    max_reserved_idle_s: float = 0.0  # longest wait from reservation to inference start
    first_reserved_at: float | None = None
    last_posted_at: float | None = None

    @property
    def images_per_s(self) -> float:
        if self.first_reserved_at is None or self.last_posted_at is None:
            return 0.0
        span = self.last_posted_at - self.first_reserved_at
        return (self.images + self.errors) / span if span > 0 else 0.0


@dataclass
class Ledger:
    worker: str
    clock: Callable[[], float] = time.monotonic
    jobs: dict[int, JobLedger] = field(default_factory=dict)
    started_at: float = field(default=0.0)
    slot_busy_s: float = 0.0
    batches: int = 0

    def __post_init__(self) -> None:
        self.started_at = self.clock()

    def job(self, job_id: int, pipeline: str | None = None, priority: int | None = None) -> JobLedger:
        entry = self.jobs.get(job_id)
        if entry is None:
            entry = self.jobs[job_id] = JobLedger(job_id)
        if pipeline is not None:
            entry.pipeline = pipeline
        if priority is not None:
            entry.priority = priority
        return entry

    def reserved(self, job_id: int, n: int, redelivered: int = 0) -> None:
        entry = self.job(job_id)
        entry.reserved += n
        entry.redelivered += redelivered
        if entry.first_reserved_at is None:
            entry.first_reserved_at = self.clock()

    def batch(self, shares: dict[int, float], counts: dict[int, int], idle_s: dict[int, float]) -> None:
        self.batches += 1
        self.slot_busy_s += sum(shares.values())
        for job_id, seconds in shares.items():
            entry = self.job(job_id)
            entry.slot_s += seconds
            entry.batches += 1
        for job_id, idle in idle_s.items():
            entry = self.job(job_id)
            entry.max_reserved_idle_s = max(entry.max_reserved_idle_s, idle)

    def posted(self, job_id: int, ok: int, errors: int) -> None:
        entry = self.job(job_id)
        entry.images += ok
        entry.errors += errors
        entry.last_posted_at = self.clock()

    def post_made(self, job_id: int) -> None:
        self.job(job_id).posts += 1

    def count(self, job_id: int, what: str, n: int = 1) -> None:
        entry = self.job(job_id)
        setattr(entry, what, getattr(entry, what) + n)

    @property
    def uptime_s(self) -> float:
        return self.clock() - self.started_at

    def totals(self) -> dict[str, float]:
        images = sum(j.images for j in self.jobs.values())
        errors = sum(j.errors for j in self.jobs.values())
        up = self.uptime_s
        return {
            "jobs": len(self.jobs),
            "images": images,
            "errors": errors,
            "batches": self.batches,
            "slot_busy_s": round(self.slot_busy_s, 3),
            "uptime_s": round(up, 3),
            "slot_utilisation": round(self.slot_busy_s / up, 4) if up > 0 else 0.0,
            "images_per_s": round((images + errors) / up, 3) if up > 0 else 0.0,
        }

    def rows(self) -> list[dict[str, object]]:
        """One row per job, for table artifacts and the terminal."""
        busy = self.slot_busy_s or 1.0
        out = []
        for entry in sorted(self.jobs.values(), key=lambda j: j.job_id):
            row = asdict(entry)
            row.pop("first_reserved_at")
            row.pop("last_posted_at")
            row["slot_s"] = round(entry.slot_s, 3)
            row["slot_share"] = round(entry.slot_s / busy, 4)
            row["images_per_s"] = round(entry.images_per_s, 3)
            row["max_reserved_idle_s"] = round(entry.max_reserved_idle_s, 3)
            out.append(row)
        return out


class BatchLog:
    """One JSON line per batch (the bench reads them: slot seconds, reservation idle times).

    Both the fair worker and the drain baseline write through this, so the bench
    compares them on one format. A no-op without a path.
    """

    def __init__(self, path: Path | None, worker: str):
        self.worker = worker
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - line-buffered, closed by close()

    def write(self, pipeline: str, slot_s: float, jobs: dict[int, int], max_idle_s: float) -> None:
        """A batch that just ended after ``slot_s`` seconds (wall-clock stamps, to line up processes)."""
        if self._file is None:
            return
        t_end = time.time()
        self._file.write(json.dumps({
            "worker": self.worker, "pipeline": pipeline, "t_start": t_end - slot_s, "t_end": t_end,
            "slot_s": round(slot_s, 6), "n": sum(jobs.values()), "jobs": {str(k): v for k, v in jobs.items()},
            "max_reserved_idle_s": round(max_idle_s, 6),
        }) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
