"""The reserver: reserve just the tasks the next batches will take, never more than the window holds.

The fair scheduler says which jobs the next batch should come from; the budget
(:func:`~antenna_flows.scheduler.reservation_cap`) says how many tasks the slots
will start within ``reserve_fraction * ack_wait``, counting what they still have
to finish. What happens to each reserved task is the intake's (:mod:`.intake`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from antenna_flows.antenna_client import AuthError, Rejected
from antenna_flows.jetstream import Reservation, StreamGone
from antenna_flows.orchestration import Orchestrator
from antenna_flows.scheduler import FairScheduler, reservation_cap
from antenna_flows.transport import Transport
from antenna_flows.worker.base import OUTAGES, TICK_S, FatalWorkerError, Pulse, wait_for
from antenna_flows.worker.held import WAITING, State, TaskStore
from antenna_flows.worker.intake import Intake
from antenna_flows.worker.rotation import Rotation

log = logging.getLogger(__name__)


@dataclass
class ReservePolicy:
    """How far ahead to reserve (from WorkerSettings)."""

    prefetch_batches: int = 1
    max_batch_size: int = 8
    reserve_fraction: float = 0.5
    prefetch_lead_s: float = 2.0


def trim(wants: dict[int, int], room: int) -> dict[int, int]:
    """Cut a reservation plan to ``room`` tasks, keeping its order (the fair order)."""
    out = {}
    for job_id, n in wants.items():
        if room <= 0:
            break
        take = min(n, room)
        out[job_id] = take
        room -= take
    return out


class Reserver:
    def __init__(self, name: str, transport: Transport, store: TaskStore, rotation: Rotation,
                 scheduler: FairScheduler, intake: Intake, orchestrator: Orchestrator, policy: ReservePolicy,
                 pulse: Pulse, *, busy_for_s: Callable[[], float], holding_only: Callable[[], bool],
                 on_stream_gone: Callable[[int, str], Awaitable[None]],
                 on_fatal: Callable[[BaseException], None]):
        self.name = name
        self.transport = transport
        self.store = store
        self.rotation = rotation
        self.scheduler = scheduler
        self.intake = intake
        self.orch = orchestrator
        self.policy = policy
        self.pulse = pulse
        self.busy_for_s = busy_for_s  # seconds until a slot frees (the slots know)
        self.holding_only = holding_only  # rolling over: reserve nothing more
        self.on_stream_gone = on_stream_gone
        self.on_fatal = on_fatal

    async def run(self) -> None:
        while not self.pulse.stopping.is_set():
            try:
                await self.round()
            except AuthError as exc:
                self.on_fatal(FatalWorkerError(f"Antenna rejected the worker's token: {exc}"))
                return
            except OUTAGES as exc:  # NATS or Antenna briefly away: the next round tries again
                log.warning("worker %s: reservation failed: %s", self.name, exc)
            await wait_for(self.pulse.reserve, TICK_S)

    # --- reserving ----------------------------------------------------------------------

    async def round(self) -> None:
        """Top the pool up to the next batch (within the cap), re-planning when a job comes up short."""
        p = self.policy
        for _ in range(len(self.rotation) + 1):
            if self.pulse.stopping.is_set() or self.holding_only():
                return
            pool = self.store.waiting_counts()
            busy_for = self.busy_for_s()
            cap = reservation_cap(self.rotation.ack_wait_s(), p.reserve_fraction, self.rotation.per_image_s(), busy_for)
            target = min(p.prefetch_batches * p.max_batch_size, cap)
            if target < 1:
                # The window cannot hold a prefetched image (slow model, short ack_wait): take the
                # next one only when the slot is about to free, early enough to download it.
                if pool or busy_for > p.prefetch_lead_s:
                    return
                target = cap = 1
            wants = self.scheduler.plan_reservations(pool, target, self.rotation.cost.per_image)
            # Tasks a newcomer displaces in fair order wait one batch more: where the window holds
            # two batches, allow one batch over the cap for them (urgency bounds their wait).
            slack = target if cap >= 2 * target else 0
            wants = trim(wants, cap + slack - sum(pool.values()))
            if not wants:
                return
            if all(self.scheduler.dry_for(j) > 0 for j in wants):
                # Only probing jobs that had nothing last time: not worth a unit of record of its own.
                got = await self.reserve(wants)
            else:
                got = await self.orch.reserve(self.reserve, wants)
            if got >= sum(wants.values()):
                return

    async def reserve(self, wants: dict[int, int]) -> int:
        """One reservation round: reserve ``wants[job]`` from each job, all jobs at once; returns how many came.

        At once, because over REST each ``/tasks`` call may hold for Antenna's 0.5 s fetch when a job has
        fewer tasks than asked: one job after another, a round over six jobs could take three seconds.
        """
        plan = {job_id: n for job_id, n in wants.items() if job_id in self.rotation}

        async def one(job_id: int, n: int) -> list[Reservation] | str:
            try:
                return await self.transport.reserve(job_id, n)
            except StreamGone:
                return "stream vanished (completed or cancelled)"
            except Rejected as exc:  # e.g. 400: not an async job: nothing this worker can take from it
                return f"Antenna refused to hand out its tasks: {exc}"

        answers = await asyncio.gather(*(one(j, n) for j, n in plan.items()), return_exceptions=True)
        got_total = 0
        failure: BaseException | None = None
        for (job_id, n), got in zip(plan.items(), answers):
            if isinstance(got, BaseException):
                if failure is None or isinstance(failure, OUTAGES):
                    failure = got  # a refusal or a bug outranks an outage
                continue
            if isinstance(got, str):
                await self.on_stream_gone(job_id, got)
                continue
            self.intake.accept(job_id, got)
            got_total += len(got)
            if len(got) < n:
                self.scheduler.mark_dry(job_id)
        if failure is not None and (not got_total or not isinstance(failure, OUTAGES)):
            raise failure  # an outage: the orchestrator retries the round; anything else: the worker sees it
        return got_total


def urgent_tasks(store: TaskStore, rotation: Rotation, max_batch_size: int) -> dict[int, int]:
    """Per job, ready tasks that would overstay the reservation window if they waited two more batches.

    Tasks a newcomer displaced in fair order would otherwise age in the pool; these go
    first, so no reservation sits idle past ``reserve_fraction * ack_wait``.
    """
    urgent_age = rotation.window_s() - 2 * rotation.per_image_s() * max_batch_size
    now = rotation.clock()
    out: dict[int, int] = {}
    for job_id in store.jobs():
        n = 0
        for held in store.of_job(job_id, *WAITING):  # oldest first
            if now - held.r.reserved_at < urgent_age:
                break
            n += held.state is State.READY
        if n:
            out[job_id] = n
    return out
