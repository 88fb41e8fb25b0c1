"""The reserver: reserve just the tasks the next batches will take, never more than the window holds.

The fair scheduler says which jobs the next batch should come from; the budget
(:func:`~antenna_flows.scheduler.reservation_cap`) says how many tasks the slot
will start within ``reserve_fraction * ack_wait``, counting what it still has to
finish. Downloads start the moment a task is reserved, so the next batch is
decoded while the current one runs.

A delivery of an image the worker already holds joins it (answered together).
A delivery of an image the worker already *answered* means Antenna's save did
not happen (Antenna acks only after saving): it is answered again, by re-posting
the answer if it is still kept, else by computing it again. Never ack-and-skip.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from antenna_flows.antenna_client import AuthError
from antenna_flows.jetstream import Reservation, StreamGone
from antenna_flows.scheduler import reservation_cap
from antenna_flows.worker import poster
from antenna_flows.worker.base import TICK_S, wait_for
from antenna_flows.worker.discovery import forget
from antenna_flows.worker.held import HeldTask, State

if TYPE_CHECKING:
    from antenna_flows.worker.core import FairWorker

log = logging.getLogger(__name__)


async def loop(w: "FairWorker") -> None:
    while not w.stopping.is_set():
        try:
            await reserve_round(w)
        except AuthError as exc:
            w.token_rejected(exc)
            return
        except Exception as exc:  # noqa: BLE001 - NATS hiccups: retried next tick
            log.warning("worker %s: reservation failed: %s", w.name, exc)
        await wait_for(w.wake_reserver, TICK_S)


# --- the budget ---------------------------------------------------------------------


def busy_for_s(w: "FairWorker") -> float:
    """How long until a slot frees: 0 if one is idle, else the soonest expected end of a running batch."""
    if len(w.running) < w.settings.slots:
        return 0.0
    now = w.clock()
    return max(0.0, min(b.size * w.cost.per_image(b.pipeline) - (now - b.started) for b in w.running.values()))


def batch_limit(w: "FairWorker") -> int:
    """Largest batch whose images all start within the reservation window."""
    cap = reservation_cap(w.ack_wait_s(), w.settings.reserve_fraction, w.per_image_s())
    return max(1, min(w.settings.max_batch_size, cap))


def urgent(w: "FairWorker") -> dict[int, int]:
    """Ready tasks that would overstay the reservation window if they waited two more batches.

    Tasks a newcomer displaced in fair order would otherwise age in the pool; these
    go first, so no reservation sits idle past ``reserve_fraction * ack_wait``.
    """
    window = w.ack_wait_s() * w.settings.reserve_fraction
    urgent_age = window - 2 * w.per_image_s() * w.settings.max_batch_size
    now = w.clock()
    out: dict[int, int] = {}
    for job_id in w.store.jobs():
        n = 0
        for held in w.store.of_job(job_id, State.RESERVED, State.LOADING, State.READY):  # oldest first
            if now - held.r.reserved_at < urgent_age:
                break
            n += held.state is State.READY
        if n:
            out[job_id] = n
    return out


def _trim(wants: dict[int, int], room: int) -> dict[int, int]:
    """Cut a reservation plan to ``room`` tasks, keeping its order (the fair order)."""
    out = {}
    for job_id, n in wants.items():
        if room <= 0:
            break
        take = min(n, room)
        out[job_id] = take
        room -= take
    return out


# --- reserving ----------------------------------------------------------------------


async def reserve_round(w: "FairWorker") -> None:
    """Top the pool up to the next batch (within the cap), re-planning when a job comes up short."""
    s = w.settings
    for _ in range(len(w.jobs) + 1):
        if w.stopping.is_set() or w.draining:
            return
        pool = w.store.waiting_counts()
        busy_for = busy_for_s(w)
        cap = reservation_cap(w.ack_wait_s(), s.reserve_fraction, w.per_image_s(), busy_for)
        target = min(s.prefetch_batches * s.max_batch_size, cap)
        if target < 1:
            # The window cannot hold a prefetched image (slow model, short ack_wait): take the
            # next one only when the slot is about to free, early enough to download it.
            if pool or busy_for > s.prefetch_lead_s:
                return
            target = cap = 1
        wants = w.scheduler.plan_reservations(pool, target, w.cost.per_image)
        # Tasks a newcomer displaces in fair order wait one batch more: where the window holds
        # two batches, allow one batch over the cap for them (urgency bounds their wait).
        slack = target if cap >= 2 * target else 0
        wants = _trim(wants, cap + slack - sum(pool.values()))
        if not wants:
            return
        if all(w.scheduler.dry_for(j) > 0 for j in wants):
            # Only probing jobs that had nothing last time: not worth a unit of record of its own.
            got = await reserve(w, wants)
        else:
            got = await w.orch.reserve(lambda plan: reserve(w, plan), wants)
        if got >= sum(wants.values()):
            return


async def reserve(w: "FairWorker", wants: dict[int, int]) -> int:
    """One reservation round: reserve ``wants[job]`` from each job, all jobs at once; returns how many came.

    At once, because over REST each ``/tasks`` call may hold for Antenna's 0.5 s fetch when a job has
    fewer tasks than asked: one job after another, a round over six jobs could take three seconds.
    """
    assert w.transport is not None
    transport = w.transport
    plan = {job_id: n for job_id, n in wants.items() if job_id in w.jobs}

    async def one(job_id: int, n: int) -> list[Reservation] | None:
        try:
            return await transport.reserve(job_id, n)
        except StreamGone:
            return None

    answers = await asyncio.gather(*(one(j, n) for j, n in plan.items()), return_exceptions=True)
    got_total = 0
    failure: BaseException | None = None
    for (job_id, n), got in zip(plan.items(), answers):
        if isinstance(got, BaseException):
            failure = failure or got
            continue
        if got is None:
            await forget(w, job_id, "stream vanished (completed or cancelled)")
            continue
        accept(w, job_id, got)
        got_total += len(got)
        if len(got) < n:
            w.scheduler.mark_dry(job_id)
    if failure is not None and not got_total:
        raise failure  # an outage: the orchestrator retries the round
    return got_total


def accept(w: "FairWorker", job_id: int, reservations: list[Reservation]) -> None:
    """Take reserved tasks into the store: new work, a twin of a held image, or a re-answer."""
    if not reservations:
        return
    w.scheduler.mark_wet(job_id)
    redelivered = sum(1 for r in reservations if r.num_delivered > 1)
    for r in reservations:
        r.reserved_at = w.clock()
        held = HeldTask(r)
        key = held.key
        twin = w.store.find(key) if key is not None else None
        if twin is not None:
            twin.twins.append(r)  # same image already with us: answer both deliveries together
            log.info("worker %s: job %s image %s delivered again (delivery %d) while we hold it",
                     w.name, job_id, key[1] if key else "?", r.num_delivered)
            continue
        if w.store.answered(key):
            held.reanswer = True
            kept = w.store.answer_of(key)  # type: ignore[arg-type]
            log.warning("worker %s: job %s image %s redelivered (delivery %d) after we answered it: "
                        "Antenna did not save it; answering again (%s)", w.name, job_id, key[1] if key else "?",
                        r.num_delivered, "re-posting the answer" if kept is not None else "recomputing")
            if kept is not None:
                held.result = kept
                held.state = State.POSTING
                w.store.add(held)
                poster.post_in_background(w, [held])
                continue
            w.ledger.count(job_id, "recomputed")
        w.store.add(held)
        if r.task is None and r.image_id is None:
            # Nothing in it says which image it is: Antenna could attribute no answer to it.
            log.error("worker %s: job %s: %s (seq %s): no image to answer for", w.name, job_id, r.parse_error,
                      r.stream_seq)
            assert w.settler is not None
            w.spawn(w.settler.settle([held], State.TERMINATED, "malformed task naming no image"), "terminate")
            continue
        if r.task is not None:
            assert w.loader is not None
            held.state = State.LOADING
            held.image = asyncio.create_task(w.loader.load(r.task.image_url, w.model.prepare, w.model.decode))
            held.image.add_done_callback(_image_done(w, held))
        else:
            held.state = State.READY  # a malformed task naming its image: an error result is its answer
    if redelivered:
        log.info("worker %s: job %s: %d of %d reserved tasks were redeliveries", w.name, job_id, redelivered,
                 len(reservations))
    w.ledger.reserved(job_id, len(reservations), redelivered)
    w.pool_changed.set()


def _image_done(w: "FairWorker", held: HeldTask) -> Any:
    def done(task: asyncio.Task[Any]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here; the batch reads it again and answers with an error result
            if held.state is State.LOADING:
                w.store.move(held, State.READY)
        w.pool_changed.set()

    return done
