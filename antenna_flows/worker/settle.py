"""How a held task ends: the only place a task leaves the worker, and the only place that decides how.

Every task the worker reserves ends in exactly one of four ways (``held.State``):

- **answered**: Antenna accepted our result (200). The worker does *not* ack it:
  Antenna acks after its background save, and a failed save leaves the message
  unacked for NATS to redeliver. So the worker sends one last +WPI (Antenna gets
  a full ``ack_wait`` to save before any redelivery) and then lets go; the answer
  is remembered, so a redelivery is answered again without recomputing.
- **released**: handed back with a jittered ``nak`` (stop, outage, wrong token);
  any worker may take it again.
- **dropped**: the job's stream vanished (completed or cancelled): nothing to
  answer to.
- **terminated**: Antenna accepts no answer for it (``term``): redelivering it
  could never end differently.
- **saved**: a redelivery held while Antenna might still be saving our earlier
  answer (over NATS), and it did: the message is acked; nothing is sent, nothing
  is answered twice.

What a result post's outcome means for its tasks is decided here too
(:meth:`Settler.after_post`): accepted -> answered; an outage that outlived the
orchestrator's retries -> released; 404 (the job is gone) -> dropped; a wrong
token -> released and the worker stops; any other refusal (400) -> the poster
posts the answers one by one (:meth:`Settler.after_single_post` ends each).
"""

from __future__ import annotations

import logging
import random
from typing import Callable, Iterable

from antenna_flows.accounting import Ledger
from antenna_flows.antenna_client import AuthError, Rejected
from antenna_flows.schemas import PipelineResultsResponse
from antenna_flows.transport import Transport
from antenna_flows.worker.base import FatalWorkerError
from antenna_flows.worker.held import WAITING, HeldTask, State, TaskStore

log = logging.getLogger(__name__)


class Settler:
    """Applies an ending to held tasks: the transport call, the ledger line, out of the store."""

    def __init__(self, worker: str, store: TaskStore, ledger: Ledger, transport: Transport,
                 release_delay_s: float, on_fatal: Callable[[BaseException], None],
                 on_answered: Callable[[HeldTask], None] = lambda held: None, rng: random.Random | None = None):
        self.worker = worker
        self.store = store
        self.ledger = ledger
        self.transport = transport
        self.release_delay_s = release_delay_s
        self.on_fatal = on_fatal
        self.on_answered = on_answered  # (the pacer learns how long a task is held)
        self.rng = rng or random.Random()

    def release_delay(self) -> float:
        """Jittered, so a fleet releasing at once does not re-reserve in lock-step."""
        return self.release_delay_s * self.rng.uniform(1.0, 2.0)

    async def settle(self, tasks: Iterable[HeldTask], outcome: State, why: str = "") -> int:
        """End ``tasks`` (those not already settled) with ``outcome``; returns how many ended."""
        tasks = [h for h in tasks if not h.state.settled]
        if not tasks:
            return 0
        per_job: dict[int, int] = {}
        for held in tasks:
            per_job[held.job_id] = per_job.get(held.job_id, 0) + 1
            if held.image is not None and not held.image.done():
                held.image.cancel()
            held.image = None
            if outcome is State.ANSWERED:
                ok = isinstance(held.result, PipelineResultsResponse)
                self.ledger.posted(held.job_id, int(ok), int(not ok))
                if held.reanswer:
                    self.ledger.count(held.job_id, "reanswered")
                for r in held.reservations():  # Antenna gets a full ack_wait to save, then we let go
                    await self.transport.in_progress(r)
                self.on_answered(held)
            elif outcome is State.RELEASED:
                for r in held.reservations():
                    await self.transport.nak(r, self.release_delay())
            elif outcome is State.TERMINATED:
                for r in held.reservations():
                    await self.transport.term(r)
            self.store.settle(held, outcome)
        for job_id, n in per_job.items():
            if outcome is not State.ANSWERED:
                self.ledger.count(job_id, outcome.value, n)
            if outcome is State.DROPPED:
                log.warning("worker %s: job %s: dropped %d tasks (%s)", self.worker, job_id, n, why)
            elif outcome is State.RELEASED:
                log.warning("worker %s: job %s: released %d tasks (%s)", self.worker, job_id, n, why)
            elif outcome is State.TERMINATED:
                log.error("worker %s: job %s: terminated %d tasks (%s)", self.worker, job_id, n, why)
            elif outcome is State.SAVED:
                log.info("worker %s: job %s: %d redelivered tasks were acked by Antenna's late save of our "
                         "earlier answer: not answered twice", self.worker, job_id, n)
        return len(tasks)

    async def release_waiting(self, why: str) -> int:
        """Hand back every task not started (stop, a failed part)."""
        return await self.settle(list(self.store.all(*WAITING)), State.RELEASED, why)

    async def drop_job(self, job_id: int, why: str) -> int:
        """The job left the rotation: its waiting tasks have nothing to be answered to."""
        return await self.settle(self.store.of_job(job_id, *WAITING), State.DROPPED, why)

    async def after_post(self, job_id: int, tasks: list[HeldTask], error: BaseException | None) -> list[HeldTask]:
        """End a post's tasks by its final error (after retries); returns those to post one by one (400)."""
        if error is None:
            await self.settle(tasks, State.ANSWERED)
        elif isinstance(error, AuthError):
            await self.settle(tasks, State.RELEASED, f"token rejected: {error}")
            self.on_fatal(FatalWorkerError(f"Antenna rejected the worker's token: {error}"))
        elif isinstance(error, Rejected) and error.status == 404:
            await self.settle(tasks, State.DROPPED, "the job is gone from Antenna (404)")
        elif isinstance(error, Rejected):
            log.error("worker %s: job %s refused a post of %d answers: %s; posting them one by one",
                      self.worker, job_id, len(tasks), error)
            return tasks
        else:
            await self.settle(tasks, State.RELEASED, f"posting failed after retries: {error}")
        return []

    async def after_single_post(self, held: HeldTask, error: BaseException | None, last_attempt: bool) -> bool:
        """End one answer posted on its own (isolating a refusal); True if it ended.

        A refused answer that was the last attempt (its error-result replacement refused
        too) means Antenna does not know the task: it is terminated, never redelivered.
        """
        if error is None:
            await self.settle([held], State.ANSWERED)
        elif isinstance(error, Rejected) and not isinstance(error, AuthError):
            log.error("worker %s: job %s task %s (seq %s): refused: %s", self.worker, held.job_id,
                      held.r.image_id, held.r.stream_seq, error)
            if not last_attempt:
                return False
            await self.settle([held], State.TERMINATED, f"task at seq {held.r.stream_seq} is unknown to Antenna")
        else:
            await self.after_post(held.job_id, [held], error)
        return True
