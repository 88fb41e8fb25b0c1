"""Who gets the GPU next: fair sharing across jobs, charged in measured slot seconds.

Pure logic (no I/O, no Prefect, injectable clock) so it is unit-tested with a
fake clock and reused as-is by the worker and the benchmark.

The rule is start-time fair queueing (a stride scheduler with virtual time):

- every job carries a virtual time ``vtime``: the inference-slot seconds it has
  been charged, divided by its weight;
- the next image goes to the job with the highest priority tier, then the
  lowest ``vtime``; an image tentatively charges its job the pipeline's
  estimated seconds per image, and the estimate is replaced by the measured
  share of the batch when the batch finishes (a job is charged
  ``batch_seconds * its_images / batch_images``);
- a job that joins, or comes back after having nothing to give, starts at the
  current virtual time (the lowest ``vtime`` among the others), so it neither
  starves nor cashes in credit for time it was absent.

Over a long run each busy job in a tier gets a share of slot seconds
proportional to its weight, within one batch of the target; small jobs finish
within a few batches of arriving; a higher tier always goes first. Because a
batch is filled image by image in this order, one batch can hold several
jobs of one pipeline: fairness costs no batch efficiency.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

DRY_BACKOFF_MIN_S = 0.1
DRY_BACKOFF_MAX_S = 2.0
EWMA_ALPHA = 0.3


@dataclass
class JobEntry:
    job_id: int
    pipeline: str
    priority: int = 0
    weight: float = 1.0
    vtime: float = 0.0
    charged_s: float = 0.0
    dry_until: float = 0.0
    dry_streak: int = 0
    dry_since: float | None = None


@dataclass
class BatchTicket:
    """A started batch: what was charged on estimate, to reconcile with the measured time."""

    pipeline: str
    counts: dict[int, int]
    estimated: dict[int, float]
    started_at: float
    id: int = 0


class CostModel:
    """EWMA of inference seconds per image, per pipeline (batch overhead included)."""

    def __init__(self, default_s: float = 1.0, alpha: float = EWMA_ALPHA, initial: Mapping[str, float] | None = None):
        self.default_s = default_s
        self.alpha = alpha
        self._s: dict[str, float] = dict(initial or {})

    def per_image(self, pipeline: str) -> float:
        return self._s.get(pipeline, self.default_s)

    def seed(self, pipeline: str, seconds_per_image: float) -> None:
        self._s.setdefault(pipeline, seconds_per_image)

    def observe(self, pipeline: str, n_images: int, seconds: float) -> None:
        if n_images <= 0 or seconds <= 0:
            return
        sample = seconds / n_images
        old = self._s.get(pipeline)
        self._s[pipeline] = sample if old is None else (1 - self.alpha) * old + self.alpha * sample


def reservation_cap(ack_wait_s: float, fraction: float, seconds_per_image: float, busy_for_s: float = 0.0) -> int:
    """Most reserved-but-not-started tasks such that all start within ``fraction * ack_wait``.

    ``busy_for_s`` is how long the slot is still expected to be busy before the
    first of them can start. May be 0: then nothing should wait reserved (the
    worker still takes one batch when the slot is about to free, see
    ``prefetch_lead_s``; +WPI covers a single image slower than the window).
    """
    if seconds_per_image <= 0:
        return 1 << 30
    return max(0, math.floor((fraction * ack_wait_s - busy_for_s) / seconds_per_image))


@dataclass
class FairScheduler:
    clock: Callable[[], float] = time.monotonic
    jobs: dict[int, JobEntry] = field(default_factory=dict)
    _last_vtime: float = 0.0
    _tickets: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # --- membership ----------------------------------------------------------------

    def virtual_time(self) -> float:
        """The lowest vtime among jobs that currently have work to give (else the last seen)."""
        live = [j.vtime for j in self.jobs.values() if j.dry_since is None]
        if live:
            self._last_vtime = max(self._last_vtime, min(live))
        return self._last_vtime

    def add(self, job_id: int, pipeline: str, priority: int = 0, weight: float = 1.0) -> JobEntry:
        """Join (at the current virtual time) or update priority/weight of a known job."""
        if weight <= 0:
            raise ValueError(f"job {job_id}: weight must be > 0, got {weight}")
        entry = self.jobs.get(job_id)
        if entry is None:
            entry = JobEntry(job_id, pipeline, priority, weight, vtime=self.virtual_time())
            self.jobs[job_id] = entry
        else:
            entry.pipeline, entry.priority, entry.weight = pipeline, priority, weight
        return entry

    def remove(self, job_id: int) -> None:
        entry = self.jobs.pop(job_id, None)
        if entry is not None:
            self._last_vtime = max(self._last_vtime, min(entry.vtime, self.virtual_time()))

    def __contains__(self, job_id: int) -> bool:
        return job_id in self.jobs

    # --- availability ----------------------------------------------------------------

    def mark_dry(self, job_id: int, at_least_s: float = 0.0) -> None:
        """A reservation found nothing: back off probing this job (0.1 s doubling to 2 s, or ``at_least_s``:
        a job whose queue said nothing is left undelivered needs probing only for redeliveries)."""
        entry = self.jobs.get(job_id)
        if entry is None:
            return
        now = self.clock()
        if entry.dry_since is None:
            entry.dry_since = now
        entry.dry_streak += 1
        backoff = min(DRY_BACKOFF_MAX_S, DRY_BACKOFF_MIN_S * 2 ** (entry.dry_streak - 1))
        entry.dry_until = now + max(backoff, at_least_s)

    def mark_wet(self, job_id: int) -> None:
        """The job gave work: it is eligible again, rejoining at the current virtual time."""
        entry = self.jobs.get(job_id)
        if entry is None or entry.dry_since is None:
            return
        entry.vtime = max(entry.vtime, self.virtual_time())  # before it counts as live again
        entry.dry_since = None
        entry.dry_streak = 0
        entry.dry_until = 0.0

    def poke(self, job_id: int) -> None:
        """Something says the job has work (new job advisory, API listing): probe it now."""
        entry = self.jobs.get(job_id)
        if entry is not None:
            entry.dry_until = 0.0

    def eligible(self, job_id: int) -> bool:
        entry = self.jobs.get(job_id)
        return entry is not None and entry.dry_until <= self.clock()

    def dry_for(self, job_id: int) -> float:
        """Seconds since this job last gave work (0 if it is not dry)."""
        entry = self.jobs.get(job_id)
        if entry is None or entry.dry_since is None:
            return 0.0
        return self.clock() - entry.dry_since

    # --- decisions ---------------------------------------------------------------------

    def _picks(
        self,
        supply: Mapping[int, float],
        limit: int,
        cost: Callable[[str], float],
        urgent: Mapping[int, int] | None = None,
    ) -> tuple[str | None, list[int]]:
        """Greedy fair order: ``limit`` picks from jobs with supply, all of one pipeline.

        ``urgent[job]`` of a job's supply go before anything else (still in fair order among
        themselves): reserved tasks about to overstay their reservation window.
        """
        tentative = {j: self.jobs[j].vtime for j in supply if j in self.jobs}
        remaining = {j: s for j, s in supply.items() if j in self.jobs and s > 0}
        pressing = {j: n for j, n in (urgent or {}).items() if n > 0 and j in remaining}
        pipeline: str | None = None
        picks: list[int] = []
        while len(picks) < limit:
            candidates = [j for j in remaining if pipeline is None or self.jobs[j].pipeline == pipeline]
            if not candidates:
                break
            best = min(
                candidates,
                # ties go to the job charged least so far: a newcomer joining at the virtual time goes first
                key=lambda j: (j not in pressing, -self.jobs[j].priority, tentative[j], self.jobs[j].charged_s, j),
            )
            if pipeline is None:
                pipeline = self.jobs[best].pipeline
            picks.append(best)
            tentative[best] += cost(pipeline) / self.jobs[best].weight
            remaining[best] -= 1
            if remaining[best] <= 0:
                del remaining[best]
            if best in pressing:
                pressing[best] -= 1
                if pressing[best] <= 0:
                    del pressing[best]
        return pipeline, picks

    def select_batch(
        self,
        pool: Mapping[int, int],
        max_batch: int,
        cost: Callable[[str], float],
        urgent: Mapping[int, int] | None = None,
    ) -> tuple[str | None, dict[int, int]]:
        """From reserved tasks (count per job), the next batch: one pipeline, urgent first, then fair order."""
        pipeline, picks = self._picks(pool, max_batch, cost, urgent)
        return pipeline, dict(Counter(picks))

    def plan_reservations(
        self, pool: Mapping[int, int], target: int, cost: Callable[[str], float]
    ) -> dict[int, int]:
        """How many to reserve from which job so the pool holds the next ``target`` fair picks.

        Tasks already reserved count first; only eligible (not dry) jobs can supply more.
        """
        supply: dict[int, float] = {}
        for job_id in self.jobs:
            have = pool.get(job_id, 0)
            extra = math.inf if self.eligible(job_id) else 0
            if have + extra > 0:
                supply[job_id] = have + extra
        _, picks = self._picks(supply, target, cost)
        return {j: n - pool.get(j, 0) for j, n in Counter(picks).items() if n > pool.get(j, 0)}

    def start_batch(self, pipeline: str, counts: Mapping[int, int], cost: Callable[[str], float]) -> BatchTicket:
        """Charge the batch's jobs on estimate now, so planning the next batch sees it."""
        estimated = {}
        for job_id, n in counts.items():
            entry = self.jobs.get(job_id)
            seconds = n * cost(pipeline)
            estimated[job_id] = seconds
            if entry is not None:
                entry.vtime += seconds / entry.weight
        return BatchTicket(pipeline, dict(counts), estimated, self.clock(), next(self._tickets))

    def finish_batch(self, ticket: BatchTicket, seconds: float) -> dict[int, float]:
        """Replace the estimate by each job's measured share of ``seconds``; returns the shares."""
        total = sum(ticket.counts.values()) or 1
        shares = {}
        for job_id, n in ticket.counts.items():
            share = seconds * n / total
            shares[job_id] = share
            entry = self.jobs.get(job_id)
            if entry is not None:
                entry.vtime += (share - ticket.estimated.get(job_id, 0.0)) / entry.weight
                entry.charged_s += share
        return shares
