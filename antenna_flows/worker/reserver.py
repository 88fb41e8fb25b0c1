"""The reserver: reserve just the tasks the next batches will take, never more than the windows hold.

Two windows bound it. The GPU's: the fair scheduler says which jobs the next batch
should come from; the budget (:func:`~antenna_flows.scheduler.reservation_cap`) says
how many tasks the slots will start within ``reserve_fraction * ack_wait``, counting
what they still have to finish. Antenna's: the save pacer
(:mod:`antenna_flows.pacing`) says how many more the fleet may have in flight without
growing Antenna's save queue, of which this worker takes its share. While the pacer
binds, the worker reserves in chunks of one job at a time (at least
``min_chunk``: one request, one post), waiting for that much room, rather than
asking every job for one or two: fairness over time is the scheduler's, which charges
each job for what it runs.

Requests to Antenna are spent with care: a job whose queue said (in its tasks'
reply subjects) that nothing is left undelivered is probed again only after
``drained_probe_s`` (for redeliveries), not every tick, and over REST not before its
``ack_wait`` (nothing there can hand a task back sooner: no nak, so a redelivery is
a reservation that timed out); over REST each job is asked
for at least ``min_chunk``, and no request asks for more than ``api_batch_size``.
What happens to each reserved task is the intake's (:mod:`.intake`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Awaitable, Callable

from antenna_flows.antenna_client import AuthError, Rejected
from antenna_flows.jetstream import Reservation, StreamGone
from antenna_flows.orchestration import Orchestrator
from antenna_flows.fleet_share import FleetShare
from antenna_flows.pacing import SavePacer
from antenna_flows.scheduler import FairScheduler, reservation_cap
from antenna_flows.transport import Transport
from antenna_flows.worker.base import OUTAGES, TICK_S, FatalWorkerError, Pulse, wait_for
from antenna_flows.worker.held import WAITING, State, TaskStore
from antenna_flows.worker.intake import Intake
from antenna_flows.worker.rotation import Rotation

log = logging.getLogger(__name__)

STALL_GRACE_S = 5.0  # no save for ack_wait plus this: probe for redeliveries (see SavePacer.stalled)
PACING_LOG_S = 10.0  # how often the pacer's view is logged while serving
RESERVE_LOG_LEVEL = logging.DEBUG


@dataclass
class ReservePolicy:
    """How far ahead to reserve and in what pieces (from WorkerSettings)."""

    prefetch_batches: int = 1
    max_batch_size: int = 8
    reserve_fraction: float = 0.5
    prefetch_lead_s: float = 2.0
    slots: int = 1
    api_batch_size: int = 24  # most tasks in one request
    min_chunk: int = 4  # paced (and over REST): at least this many of one job per request
    costly_requests: bool = False  # REST: each request is Antenna's work (a NATS connection, a fetch)
    drained_probe_s: float = 10.0  # a job with nothing undelivered: probe for redeliveries this often


def one_job(wants: dict[int, int], n: int) -> dict[int, int]:
    """The whole chunk from the job first in fair order."""
    for job_id in wants:
        return {job_id: n}
    return {}


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
                 on_fatal: Callable[[BaseException], None], pacer: SavePacer | None = None,
                 share: FleetShare | None = None):
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
        self.pacer = pacer  # None: reserve as fast as the GPU runs
        self.share = share or FleetShare(rotation.clock)
        if pacer is not None:
            pacer.fleet_holding = self.fleet_holding
            pacer.gpu_holding = lambda: self.pipeline_holding() / max(self.fleet_share(), 1e-3)
            # what is taken before Antenna's pace is known lands in its save queue at once: at most what
            # the GPU holds (over REST it must also be saved within ack_wait: nothing keeps it alive)
            pacer.cold_limit = max(self.pipeline_holding(), policy.min_chunk)
        self.paced = False  # the last round was bound by Antenna's saves (for logs and the record)
        self._said_at = -math.inf

    async def run(self) -> None:
        while not self.pulse.stopping.is_set():
            self._say()
            try:
                await self.round()
            except AuthError as exc:
                self.on_fatal(FatalWorkerError(f"Antenna rejected the worker's token: {exc}"))
                return
            except OUTAGES as exc:  # NATS or Antenna briefly away: the next round tries again
                log.warning("worker %s: reservation failed: %s", self.name, exc)
            await wait_for(self.pulse.reserve, TICK_S)

    # --- reserving ----------------------------------------------------------------------

    def _say(self) -> None:
        """The pacer's view in the log every PACING_LOG_S while serving jobs."""
        now = self.rotation.clock()
        if self.pacer is not None and len(self.rotation) and now - self._said_at >= PACING_LOG_S:
            self._said_at = now
            log.info("worker %s: %s%s", self.name, self.pacer.describe(self.fleet_share()),
                     "; paced" if self.paced else "")

    def room(self) -> float:
        """Tasks Antenna's saves leave room for (this worker's share); infinite when not pacing.

        Until the first save is seen each worker takes at most what its GPU holds (a batch
        running and the prefetched ones): enough for GPU-bound work, not a flood of answers into a
        save queue whose pace is not known yet.
        """
        if self.pacer is None:
            return math.inf
        p = self.policy
        room = self.pacer.allowance(self.fleet_share(), floor=p.min_chunk)
        if self.pacer.stalled(self.rotation.ack_wait_s() + STALL_GRACE_S):
            # no save for longer than ack_wait: what is in flight may be nobody's, waiting for a fetch
            # to redeliver it (redeliveries come first); a small probe, never more than one chunk held
            room = max(room, float(p.min_chunk - self.store.held_count()))
        return room

    def pipeline_holding(self) -> int:
        """What this worker's pipeline holds: the batches prefetched and running, and over NATS the one being
        posted (its +WPI keeps it alive); over REST nothing extends a reservation, and a fleet's cold start
        lands in Antenna's save queue whole, ahead of any job that comes next."""
        p = self.policy
        return (p.prefetch_batches + p.slots + (0 if p.costly_requests else 1)) * p.max_batch_size

    def fleet_holding(self) -> float:
        """What the fleet's workers hold unanswered (reserved, loading, ready, running, posting): in flight but
        not queued for a save, whatever the hold time says. Over NATS this worker's own count plus what the
        others said at the roll call, so every worker reads the same fleet; else this worker's over its share
        (which makes a worker that holds more read a larger window: the pipeline cap in :meth:`round` bounds it)."""
        mine = self.store.unanswered_count()
        others = self.share.others_holding(self.name) if self.share.peers() else None
        if others is not None:
            return mine + others
        return mine / max(self.fleet_share(), 1e-3)

    def fleet_share(self) -> float:
        """This worker's part of the fleet's room: exact from the roll call over NATS; over REST its
        answers over the fleet's saves (shares that sum to one), else its share of the deliveries."""
        if self.share.peers() or self.pacer is None:
            return self.share.share()
        by_answers = self.pacer.answer_share()
        return by_answers if by_answers is not None else self.share.share()

    async def round(self) -> None:
        """Top the pool up to the next batch (within both windows), re-planning when a job comes up short."""
        p = self.policy
        for _ in range(len(self.rotation) + 1):
            if self.pulse.stopping.is_set() or self.holding_only():
                return
            pool = self.store.waiting_counts()
            held = sum(pool.values())
            busy_for = self.busy_for_s()
            cap = reservation_cap(self.rotation.ack_wait_s(), p.reserve_fraction, self.rotation.per_image_s(), busy_for)
            target = min(p.prefetch_batches * p.max_batch_size, cap)
            if target < 1:
                # The window cannot hold a prefetched image (slow model, short ack_wait): take the
                # next one only when the slot is about to free, early enough to download it.
                if pool or busy_for > p.prefetch_lead_s:
                    return
                target = cap = 1
            room = self.room()
            slack = target if cap >= 2 * target else 0
            # Paced when Antenna, not the GPU's budget, decides how much to take now: its saves are the
            # bottleneck (the GPUs have time to spare: take whole chunks of one job), or its room is smaller
            # than what the GPU budget would take.
            bound = self.pacer is not None and self.pacer.bound()
            self.paced = bound or room < min(target, cap + slack) - held or (
                room < cap + slack - held and room < p.min_chunk)
            self.share.paced(self.paced)
            if self.paced:
                plan = self.scheduler.plan_reservations(pool, target, self.rotation.cost.per_image)
                # Redeliveries are already in flight: they add nothing to the window, and a failed
                # save must be answered again even while Antenna's saves are behind.
                wants = {j: n for j, n in plan.items() if self._only_redeliveries(j)}
                fresh = {j: n for j, n in plan.items() if j not in wants}
                # What the reservation window (ack_wait) still holds, and no more than this worker's pipeline
                # needs: more held buys Antenna no speed, takes its peers' room, and spreads this worker's
                # answers over more jobs (smaller posts). (Its holding widens the window it reads: unbounded,
                # one worker would take the whole queue Antenna may hold into its own pool.)
                unanswered = self.store.unanswered_count()
                budget = max(0, min(cap + slack - held, self.pipeline_holding() - unanswered))
                # A chunk is at least min_chunk, or half this worker's part of the window where that is
                # less (a fleet of many workers on a slow Antenna must still move).
                assert self.pacer is not None
                window = self.pacer.window()
                least = p.min_chunk if math.isinf(window) else min(
                    p.min_chunk, max(2, int(window * self.fleet_share() / 2)))
                if fresh and room >= least and budget >= least:
                    chunk = min(int(room), p.api_batch_size, budget)
                    wants.update(one_job(fresh, chunk))  # the whole chunk from the job first in fair order
            else:
                wants = self.scheduler.plan_reservations(pool, target, self.rotation.cost.per_image)
                # Tasks a newcomer displaces in fair order wait one batch more: where the window holds
                # two batches, allow one batch over the cap for them (urgency bounds their wait).
                wants = trim(wants, min(cap + slack - held, int(min(room, 1 << 30))))
                if p.costly_requests:
                    wants = {j: max(n, p.min_chunk) for j, n in wants.items()}
                    if not math.isinf(room):  # one request of a chunk rather than several small ones, within the room
                        wants = trim(wants, max(int(room), p.min_chunk if held == 0 else 0))
            wants = {j: min(n, p.api_batch_size) for j, n in wants.items() if n > 0}
            if not wants:
                return
            log.log(RESERVE_LOG_LEVEL, "worker %s: reserving %s (%s, room %.1f, held %d, target %d)", self.name, wants,
                    "paced" if self.paced else "GPU budget", min(room, 1e9), held, target)
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
            self.observe(job_id, got)
            self.intake.accept(job_id, got)
            got_total += len(got)
            if len(got) < n:
                drained = self._drained(got)
                self.scheduler.mark_dry(job_id, self._drained_probe_s(job_id) if drained else 0.0)
        if failure is not None and (not got_total or not isinstance(failure, OUTAGES)):
            raise failure  # an outage: the orchestrator retries the round; anything else: the worker sees it
        return got_total


    def observe(self, job_id: int, got: list[Reservation]) -> None:
        """What the reply subjects tell about the fleet: its deliveries (our share) and how far the job is."""
        infos = [i for i in (r.ack_info for r in got) if i is not None]
        last = max(infos, key=lambda i: i.consumer_seq) if infos else None
        self.share.observe(job_id, [i.consumer_seq for i in infos], last.pending if last else None)
        if self.pacer is None or last is None:
            return
        firsts = [i.stream_seq for i in infos if i.num_delivered == 1]
        if firsts:
            self.pacer.delivered(job_id, max(firsts))
            self.pacer.took(len(firsts))
        if last.pending is not None:
            self.pacer.undelivered(job_id, last.pending)

    def _only_redeliveries(self, job_id: int) -> bool:
        return self.pacer is not None and self.pacer.only_redeliveries(job_id)

    def _drained_probe_s(self, job_id: int) -> float:
        """How long a job whose queue gave out its last task is left alone: over REST a redelivery is a
        reservation that timed out, so none comes sooner than ``ack_wait`` (each probe is a request and
        Antenna's 0.5 s fetch: a fleet probing a finished small job every few seconds doubled its requests)."""
        return max(self.policy.drained_probe_s, self.rotation.ack_wait_s(job_id))

    def _drained(self, got: list[Reservation]) -> bool:
        """The job's queue said nothing is left undelivered (the last reply subject's pending count)."""
        if not self.policy.costly_requests:
            return False  # over NATS a probe costs Antenna nothing: the usual short back-off
        if not got:
            return True  # asked and got nothing
        info = got[-1].ack_info
        return info is not None and info.pending == 0


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
