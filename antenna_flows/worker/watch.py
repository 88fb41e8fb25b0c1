"""The save watch: what Antenna has saved, read where it costs Antenna nothing.

Over NATS, every ``interval_s`` it reads each served job's consumer (JetStream
only: delivered, ack pending, ack floor) and tells the pacer the job's saved
count (:mod:`antenna_flows.pacing`). It also ends the redeliveries held while
Antenna might still save our earlier answer (:mod:`.intake`): one whose message
the ack floor has passed was saved (``SAVED``: nothing sent, not answered twice);
one held a whole ``ack_wait`` without that is answered again: the earlier answer
was lost after all.

It also holds the fleet's roll call: every ``ROLL_CALL_S`` the worker says on a core
NATS subject which pipelines it serves, and counts who else does (the pacer's fleet
share). Over REST there is nothing to read or say here: the job list's progress
(discovery's poll) tells the pacer the saved counts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from antenna_flows.jetstream import StreamGone
from antenna_flows.fleet_share import ROLL_CALL_S, FleetShare
from antenna_flows.pacing import SavePacer
from antenna_flows.transport import Transport
from antenna_flows.worker.base import OUTAGES, Pulse, wait_for
from antenna_flows.worker.held import HeldTask, State, TaskStore
from antenna_flows.worker.rotation import Rotation
from antenna_flows.worker.settle import Settler

log = logging.getLogger(__name__)

COLD_INTERVAL_S = 0.25  # reading interval until the first save rate is known


class SaveWatch:
    def __init__(self, name: str, transport: Transport, rotation: Rotation, store: TaskStore, settler: Settler,
                 pacer: SavePacer, pulse: Pulse, interval_s: float, *,
                 answer_again: Callable[[HeldTask], None], share: FleetShare | None = None,
                 on_gone: Callable[[int, str], Awaitable[None]] | None = None, served: set[str] | None = None):
        self.name = name
        self.transport = transport
        self.rotation = rotation
        self.store = store
        self.settler = settler
        self.pacer = pacer
        self.pulse = pulse
        self.interval_s = interval_s
        self.answer_again = answer_again
        self.share = share
        self.on_gone = on_gone  # the job's stream vanished (completed or cancelled): discovery forgets it
        self.served = served if served is not None else set()  # peers serving any of these count as the fleet

    async def run(self) -> None:
        if not self.transport.can_extend:  # REST: the job list's progress is the signal (discovery)
            return
        if self.share is not None:
            share = self.share
            await self.transport.watch_roll_call(
                lambda worker, pipelines, holding: share.peer(worker, holding) if set(pipelines) & self.served
                else None)
        said_at = -ROLL_CALL_S
        while not self.pulse.stopping.is_set():
            if self.share is not None and self.rotation.clock() - said_at >= ROLL_CALL_S:
                said_at = self.rotation.clock()
                await self.transport.announce(self.name, sorted(self.served), self.store.unanswered_count())
            await self.look()
            cold = self.pacer.cold()  # no save rate yet: read often until there is (a job joining is read at once)
            await wait_for(self.pulse.stopping, min(self.interval_s, COLD_INTERVAL_S) if cold else self.interval_s)

    async def look(self) -> None:
        """One reading of every served job's consumer."""
        for job_id in self.rotation:
            try:
                stats = await self.transport.counts(job_id)
            except StreamGone:
                self.pacer.forget(job_id)  # what it had in flight is nobody's now
                if self.on_gone is not None:
                    await self.on_gone(job_id, "stream vanished (completed or cancelled)")
                continue
            except OUTAGES as exc:
                log.debug("worker %s: job %s: consumer not read: %s", self.name, job_id, exc)
                continue
            if stats is None:
                continue
            log.debug("worker %s: job %s: consumer read: delivered %d, awaiting an ack %d, ack floor %d, pending %d",
                      self.name, job_id, stats.delivered_msgs, stats.ack_pending, stats.ack_floor, stats.pending)
            self.pacer.saved(job_id, stats.done, stats.delivered_msgs)
            if self.share is not None:
                self.share.consumer(job_id, stats.deliveries)
            self.pacer.undelivered(job_id, stats.pending)
            await self._held_redeliveries(job_id, stats.ack_floor)
        await asyncio.sleep(0)

    async def _held_redeliveries(self, job_id: int, ack_floor: int) -> None:
        now = self.rotation.clock()
        limit = self.rotation.ack_wait_s(job_id)
        saved, lost = [], []
        for held in self.store.of_job(job_id, State.AWAITING_SAVE):
            seqs = [r.stream_seq for r in held.reservations() if r.stream_seq is not None]
            if seqs and max(seqs) <= ack_floor:
                saved.append(held)
            elif now - held.r.reserved_at >= limit:
                lost.append(held)
        if saved:
            await self.settler.settle(saved, State.SAVED, "acked by Antenna's save of our earlier answer")
        for held in lost:
            log.warning("worker %s: job %s image %s: no save of our earlier answer within %.0fs: answering again",
                        self.name, job_id, held.r.image_id, limit)
            self.answer_again(held)
