"""How a held task ends: the only place a task is handed back, dropped or terminated.

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

:func:`post_outcome` is the whole policy for a result post, e.g. "a post that
fails twice": the orchestrator retries outages with backoff (``post_retries``);
when the retries are spent the tasks are *released*.
"""

from __future__ import annotations

import enum
import logging
import random
from typing import Callable, Iterable

from antenna_flows.accounting import Ledger
from antenna_flows.antenna_client import AuthError, Rejected
from antenna_flows.schemas import PipelineResultsResponse
from antenna_flows.transport import Transport
from antenna_flows.worker.held import HeldTask, State, TaskStore

log = logging.getLogger(__name__)


class PostDecision(enum.Enum):
    ANSWERED = "answered"
    RELEASE = "release"  # outage outlived the retries: hand back
    DROP = "drop"  # 404: the job is gone from Antenna
    ISOLATE = "isolate"  # 400: find which results Antenna refuses, one by one
    FATAL = "fatal"  # wrong token: hand back and stop the worker


def post_outcome(error: BaseException | None) -> PostDecision:
    """What a result post's final error (after the orchestrator's retries) means for its tasks."""
    if error is None:
        return PostDecision.ANSWERED
    if isinstance(error, AuthError):
        return PostDecision.FATAL
    if isinstance(error, Rejected):
        return PostDecision.DROP if error.status == 404 else PostDecision.ISOLATE
    return PostDecision.RELEASE


class Settler:
    """Applies an ending to held tasks: the transport call, the ledger line, out of the store."""

    def __init__(self, worker: str, store: TaskStore, ledger: Ledger, transport: Transport,
                 release_delay_s: float, rng: random.Random | None = None):
        self.worker = worker
        self.store = store
        self.ledger = ledger
        self.transport = transport
        self.release_delay_s = release_delay_s
        self.rng = rng or random.Random()
        self.on_settled: Callable[[], None] = lambda: None

    def release_delay(self) -> float:
        """Jittered, so a fleet releasing at once does not re-reserve in lock-step."""
        return self.release_delay_s * self.rng.uniform(1.0, 2.0)

    async def settle(self, tasks: Iterable[HeldTask], outcome: State, why: str = "") -> int:
        tasks = [h for h in tasks if not h.state.settled]
        if not tasks:
            return 0
        assert outcome.settled, outcome
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
                self.store.remember_answer(held)
                for r in held.reservations():  # Antenna gets a full ack_wait to save, then we let go
                    await self.transport.in_progress(r)
            elif outcome is State.RELEASED:
                for r in held.reservations():
                    await self.transport.nak(r, self.release_delay())
            elif outcome is State.TERMINATED:
                for r in held.reservations():
                    await self.transport.term(r)
            held.state = outcome
            self.store.remove(held)
        for job_id, n in per_job.items():
            if outcome is not State.ANSWERED:
                self.ledger.count(job_id, outcome.value, n)
            if outcome is State.DROPPED:
                log.warning("worker %s: job %s: dropped %d tasks (%s)", self.worker, job_id, n, why)
            elif outcome is State.RELEASED:
                log.warning("worker %s: job %s: released %d tasks (%s)", self.worker, job_id, n, why)
            elif outcome is State.TERMINATED:
                log.error("worker %s: job %s: terminated %d tasks (%s)", self.worker, job_id, n, why)
        self.on_settled()
        return len(tasks)
