"""The rotation: the jobs this worker serves now, and the timing every part derives from them.

Discovery adds and removes jobs; the reserver, the slots and the keepalive read
them. Joining or leaving also updates the fair scheduler's membership and the
ledger's rows, so the three never disagree on who is being served. Pure state,
no I/O.
"""

from __future__ import annotations

from typing import Callable, Iterator

from antenna_flows.accounting import Ledger
from antenna_flows.scheduler import CostModel, FairScheduler, reservation_cap
from antenna_flows.worker.base import JobInfo

DEFAULT_ACK_WAIT_S = 300.0  # before any job is known (Antenna's NATS_TASK_TTR default)
LEFT_KEPT = 1024  # jobs that left whose ack_wait is remembered


class Rotation:
    def __init__(self, scheduler: FairScheduler, ledger: Ledger, cost: CostModel, *, slots: int,
                 reserve_fraction: float, max_batch_size: int, clock: Callable[[], float]):
        self.scheduler = scheduler
        self.ledger = ledger
        self.cost = cost
        self.slots = slots
        self.reserve_fraction = reserve_fraction
        self.max_batch_size = max_batch_size
        self.clock = clock
        self.jobs: dict[int, JobInfo] = {}
        self._left: dict[int, float] = {}  # ack_wait of jobs that left: their running/posting tasks still need it

    # --- membership ---------------------------------------------------------------------

    def join(self, job_id: int, pipeline: str, priority: int, ack_wait_s: float) -> JobInfo:
        info = JobInfo(job_id, pipeline, priority, ack_wait_s, self.clock())
        self.jobs[job_id] = info
        self.scheduler.add(job_id, pipeline, priority)
        self.ledger.job(job_id, pipeline, priority)
        return info

    def listed(self, job_id: int, priority: int) -> None:
        """Seen again in the job list (its priority may have changed)."""
        info = self.jobs[job_id]
        info.last_listed = self.clock()
        if info.priority != priority:
            info.priority = priority
            self.scheduler.add(job_id, info.pipeline, priority)
            self.ledger.job(job_id, priority=priority)

    def leave(self, job_id: int) -> JobInfo | None:
        self.scheduler.remove(job_id)
        info = self.jobs.pop(job_id, None)
        if info is not None:
            self._left[job_id] = info.ack_wait_s
            while len(self._left) > LEFT_KEPT:
                self._left.pop(next(iter(self._left)))
        return info

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.jobs))

    def ids(self) -> list[int]:
        return sorted(self.jobs)

    # --- timing -------------------------------------------------------------------------

    def ack_wait_s(self, job_id: int | None = None) -> float:
        """A job's ack_wait; with no job given, the shortest of any served (the window everyone fits)."""
        info = self.jobs.get(job_id) if job_id is not None else None
        if info is not None:
            return info.ack_wait_s
        if job_id is not None and job_id in self._left:
            return self._left[job_id]  # a job that left still has tasks held until they are settled
        return min((i.ack_wait_s for i in self.jobs.values()), default=DEFAULT_ACK_WAIT_S)

    def window_s(self) -> float:
        """How long a reserved task may wait before its inference starts: ``reserve_fraction * ack_wait``."""
        return self.ack_wait_s() * self.reserve_fraction

    def per_image_s(self) -> float:
        """Seconds between image starts: the slowest served pipeline's cost, spread over the slots."""
        pipelines = {info.pipeline for info in self.jobs.values()} or {""}
        return max(self.cost.per_image(p) for p in pipelines) / self.slots

    def batch_limit(self) -> int:
        """Largest batch whose images all start within the reservation window."""
        cap = reservation_cap(self.ack_wait_s(), self.reserve_fraction, self.per_image_s())
        return max(1, min(self.max_batch_size, cap))
