"""Intake: what happens to a task the moment it is reserved.

- new work enters the store and its image starts downloading at once (decoded
  in a loader thread, so the next batch is ready while the current one runs);
- a delivery of an image the worker already holds joins it (both deliveries are
  answered together, on the latest reply subject of each message);
- a delivery of an image the worker already *answered* means Antenna has not
  saved that answer (Antenna acks only after saving). Either the save failed
  (answer again: re-post the kept answer, else compute it again; never
  ack-and-skip), or it is still queued behind others: a sign of save lag, not of
  loss. Where the pacer says saves lag and the task can be held (+WPI, over NATS),
  it is held instead (``AWAITING_SAVE``) and the fleet slows down: Antenna's late
  save of the earlier answer acks the message too, and doubling the save work
  would only lengthen the queue (the field report's loop). The save watch
  (:mod:`.watch`) ends it, or has it answered again if no save comes within an
  ``ack_wait``;
- a malformed task naming its image is answered with an error result; one
  naming no image is terminated (Antenna could attribute no answer to it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Coroutine

from antenna_flows.accounting import Ledger
from antenna_flows.imageloader import ImageLoader
from antenna_flows.jetstream import Reservation
from antenna_flows.models.base import Model
from antenna_flows.scheduler import FairScheduler
from antenna_flows.worker.held import HeldTask, State, TaskStore
from antenna_flows.worker.settle import Settler

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, name: str, store: TaskStore, ledger: Ledger, scheduler: FairScheduler, loader: ImageLoader,
                 model: Model, settler: Settler, *, repost: Callable[[list[HeldTask]], Awaitable[None]],
                 spawn: Callable[[Coroutine[Any, Any, Any], str], None], clock: Callable[[], float],
                 can_hold: bool = False, saves_lag: Callable[[], bool] = lambda: False,
                 on_lag: Callable[[], None] = lambda: None):
        self.name = name
        self.store = store
        self.ledger = ledger
        self.scheduler = scheduler
        self.loader = loader
        self.model = model
        self.settler = settler
        self.repost = repost  # answers outside an inference session (a re-answer: nothing to compute)
        self.spawn = spawn
        self.clock = clock
        self.can_hold = can_hold  # +WPI available: a redelivery can be held while a save may still come
        self.saves_lag = saves_lag  # the pacer: Antenna's saves run well behind
        self.on_lag = on_lag

    def accept(self, job_id: int, reservations: list[Reservation]) -> None:
        """Take reserved tasks into the store: new work, a twin of a held image, or a re-answer."""
        if not reservations:
            return
        self.scheduler.mark_wet(job_id)
        redelivered = sum(1 for r in reservations if r.num_delivered > 1)
        for r in reservations:
            r.reserved_at = self.clock()
            self._one(job_id, r)
        if redelivered:
            log.info("worker %s: job %s: %d of %d reserved tasks were redeliveries", self.name, job_id, redelivered,
                     len(reservations))
        self.ledger.reserved(job_id, len(reservations), redelivered)

    def _one(self, job_id: int, r: Reservation) -> None:
        held = HeldTask(r)
        key = held.key
        twin = self.store.find(key) if key is not None else None
        if twin is not None:
            twin.twins.append(r)  # same image already with us: answer both deliveries together
            log.info("worker %s: job %s image %s delivered again (delivery %d) while we hold it",
                     self.name, job_id, key[1] if key else "?", r.num_delivered)
            return
        if self.store.answered(key):
            held.reanswer = True
            if self.can_hold and self.saves_lag():
                log.warning("worker %s: job %s image %s redelivered (delivery %d) after we answered it, while "
                            "Antenna's saves lag: holding it for Antenna's late save, slowing down",
                            self.name, job_id, key[1] if key else "?", r.num_delivered)
                self.store.add(held, State.AWAITING_SAVE)
                self.on_lag()
                return
            log.warning("worker %s: job %s image %s redelivered (delivery %d) after we answered it: "
                        "Antenna did not save it; answering again", self.name, job_id, key[1] if key else "?",
                        r.num_delivered)
            self.store.add(held, State.RESERVED)
            self.answer_again(held)
            return
        if r.task is None and r.image_id is None:
            # Nothing in it says which image it is: Antenna could attribute no answer to it.
            log.error("worker %s: job %s: %s (seq %s): no image to answer for", self.name, job_id, r.parse_error,
                      r.stream_seq)
            self.store.add(held, State.RESERVED)  # never READY: no batch may take it
            self.spawn(self.settler.settle([held], State.TERMINATED, "malformed task naming no image"), "terminate")
            return
        if r.task is None:
            self.store.add(held, State.READY)  # a malformed task naming its image: an error result is its answer
            return
        self.store.add(held, State.LOADING)
        self._load(held)

    def answer_again(self, held: HeldTask) -> None:
        """Answer an image again: re-post the kept answer, else compute it anew (load its image)."""
        kept = self.store.answer_of(held.key) if held.key is not None else None
        if kept is not None:
            held.result = kept
            self.store.move(held, State.POSTING)
            self.spawn(self.repost([held]), "re-post")
            return
        self.ledger.count(held.job_id, "recomputed")
        if held.r.task is None:
            self.store.move(held, State.READY)  # a malformed task: its error result is its answer
            return
        self.store.move(held, State.LOADING)
        self._load(held)

    def _load(self, held: HeldTask) -> None:
        assert held.r.task is not None
        held.image = asyncio.create_task(
            self.loader.load(held.r.task.image_url, self.model.prepare, self.model.decode))
        held.image.add_done_callback(self._image_done(held))

    def _image_done(self, held: HeldTask) -> Callable[[asyncio.Task[Any]], None]:
        def done(task: asyncio.Task[Any]) -> None:
            if not task.cancelled():
                task.exception()  # retrieved here; the batch reads it again and answers with an error result
                if held.state is State.LOADING:
                    self.store.move(held, State.READY)

        return done
