"""The posters: each batch's answers to Antenna, one request per job, then settled.

Posting is one unit of work per batch (a Prefect task run under Prefect) that
the orchestrator retries on outages (5xx, timeouts) with backoff and jitter; it
is idempotent, so a retry after a lost response never posts a job twice. What
happens to the tasks afterwards is :func:`~antenna_flows.worker.settle.post_outcome`:
accepted -> answered (Antenna acks after its save), outage outlived the
retries -> released, job gone -> dropped, refused -> isolated one by one.

Two posters run at once (as upstream's two threads) and at most
``MAX_PENDING_POSTS`` batches wait for them before the slot waits (backpressure).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from antenna_flows.antenna_client import Rejected
from antenna_flows.schemas import PipelineResultsError, TaskResult
from antenna_flows.worker.held import HeldTask, State
from antenna_flows.worker.settle import PostDecision, post_outcome

if TYPE_CHECKING:
    from antenna_flows.worker.core import FairWorker

log = logging.getLogger(__name__)

MAX_PENDING_POSTS = 4  # batches waiting to be posted before the slot waits (backpressure)
POSTERS = 2  # result posts in flight at once (as upstream's two threads)

class Posters:
    """The posting loops of one inference session."""

    def __init__(self, w: "FairWorker"):
        self.w = w
        self.queue: asyncio.Queue[list[HeldTask] | None] = asyncio.Queue(maxsize=MAX_PENDING_POSTS)
        self.tasks = [asyncio.create_task(self._loop(), name=f"poster-{i}") for i in range(POSTERS)]

    async def put(self, batch: list[HeldTask]) -> None:
        await self.queue.put(batch)

    async def _loop(self) -> None:
        while (batch := await self.queue.get()) is not None:
            await post_answers(self.w, batch)

    async def close(self) -> None:
        """Post everything queued, then end the loops."""
        for _ in self.tasks:
            await self.queue.put(None)
        await asyncio.gather(*self.tasks, return_exceptions=True)


def post_in_background(w: "FairWorker", tasks: list[HeldTask]) -> None:
    """Post answers outside a session (a re-answer of a redelivery: nothing to compute)."""
    w.spawn(post_answers(w, tasks), "re-post")


def payload(held: HeldTask) -> list[TaskResult]:
    assert held.result is not None
    return [TaskResult(reply_subject=subject, result=held.result) for subject in held.reply_subjects()]


async def post_answers(w: "FairWorker", tasks: list[HeldTask]) -> None:
    """Post a batch's answers, one request per job, as one retried unit; then settle every task."""
    assert w.client is not None
    by_job: dict[int, list[HeldTask]] = {}
    for held in tasks:
        by_job.setdefault(held.job_id, []).append(held)
    errors: dict[int, BaseException | None] = {}

    async def post_one(job_id: int) -> None:
        try:
            await w.client.post_results(job_id, [item for h in by_job[job_id] for item in payload(h)])  # type: ignore[union-attr]
            errors[job_id] = None
        except Rejected as exc:  # retrying would not change the answer (AuthError included)
            errors[job_id] = exc

    async def post() -> None:
        pending = [j for j in by_job if j not in errors]
        failures = [r for r in await asyncio.gather(*(post_one(j) for j in pending), return_exceptions=True) if r]
        if failures:
            raise failures[0]

    label = "post " + ", ".join(f"job {j} x{len(v)}" for j, v in by_job.items())
    try:
        await w.orch.post(post, label, counts={job_id: len(held) for job_id, held in by_job.items()})
    except Exception as exc:  # noqa: BLE001 - retries spent for the jobs still unposted
        for job_id in by_job:
            errors.setdefault(job_id, exc)
    for job_id, held in by_job.items():
        await settle_post(w, job_id, held, errors[job_id])


async def settle_post(w: "FairWorker", job_id: int, tasks: list[HeldTask], error: BaseException | None) -> None:
    assert w.settler is not None
    decision = post_outcome(error)
    if decision is PostDecision.ANSWERED:
        await w.settler.settle(tasks, State.ANSWERED)
    elif decision is PostDecision.FATAL:
        await w.settler.settle(tasks, State.RELEASED, f"token rejected: {error}")
        w.token_rejected(error)  # type: ignore[arg-type]
    elif decision is PostDecision.DROP:
        await w.settler.settle(tasks, State.DROPPED, "the job is gone from Antenna (404)")
    elif decision is PostDecision.ISOLATE:
        assert isinstance(error, Rejected)
        await isolate_rejected(w, job_id, tasks, error)
    else:
        await w.settler.settle(tasks, State.RELEASED, f"posting failed after retries: {error}")


async def isolate_rejected(w: "FairWorker", job_id: int, tasks: list[HeldTask], exc: Rejected) -> None:
    """Antenna refused a post (400): find which answers it refuses, so one bad task fails alone.

    Each answer is posted on its own; a refused one is replaced by an error result
    saying why; if Antenna refuses even that (it does not know the task), the
    message is terminated: redelivering it could never end differently.
    """
    assert w.client is not None and w.settler is not None
    log.error("worker %s: job %s refused a post of %d answers: %s; posting them one by one",
              w.name, job_id, len(tasks), exc)
    for held in tasks:
        assert held.result is not None
        attempts = [held.result]
        if not isinstance(held.result, PipelineResultsError):
            attempts.append(PipelineResultsError(error=f"result rejected by Antenna: {exc.body[:300]}",
                                                 image_id=held.r.image_id))
        for attempt in attempts:
            held.result = attempt
            try:
                await w.client.post_results(job_id, payload(held))
            except Rejected as again:
                log.error("worker %s: job %s task %s (seq %s): refused: %s", w.name, job_id, held.r.image_id,
                          held.r.stream_seq, again)
                continue
            except Exception as again:  # noqa: BLE001 - an outage now: hand it back
                await w.settler.settle([held], State.RELEASED, f"posting failed: {again}")
                break
            await w.settler.settle([held], State.ANSWERED)
            break
        else:
            await w.settler.settle([held], State.TERMINATED, f"task at seq {held.r.stream_seq} is unknown to Antenna")
