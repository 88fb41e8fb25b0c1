"""The poster: answers to Antenna, one request per job per batch, then each task's ending.

Posting is one unit of work per batch (recorded by the orchestrator: under Prefect,
inside a ``serve-window`` task run) that the orchestrator retries on outages (5xx,
timeouts) with backoff and jitter; it is idempotent, so a retry after a lost
response never posts a job twice. What a post's outcome means for its tasks is the
settler's decision (:meth:`~antenna_flows.worker.settle.Settler.after_post`); a
refused post is isolated here, answer by answer, so one bad task fails alone.

Two posts run at once (as upstream's two threads) and at most ``MAX_PENDING_POSTS``
batches wait for them before the slots wait (backpressure).
"""

from __future__ import annotations

import asyncio
import logging

from antenna_flows.antenna_client import AntennaClient, AntennaError, AuthError, Rejected
from antenna_flows.orchestration import Orchestrator
from antenna_flows.schemas import PipelineResultsError, TaskResult
from antenna_flows.worker.base import OUTAGES, Pulse
from antenna_flows.worker.held import HeldTask, State, TaskStore
from antenna_flows.worker.settle import Settler

log = logging.getLogger(__name__)

MAX_PENDING_POSTS = 4  # batches waiting to be posted before the slots wait (backpressure)
POSTERS = 2  # result posts in flight at once (as upstream's two threads)


def payload(held: HeldTask) -> list[TaskResult]:
    assert held.result is not None
    return [TaskResult(reply_subject=subject, result=held.result) for subject in held.reply_subjects()]


class Poster:
    def __init__(self, name: str, client: AntennaClient, orchestrator: Orchestrator, settler: Settler,
                 store: TaskStore, pulse: Pulse):
        self.name = name
        self.client = client
        self.orch = orchestrator
        self.settler = settler
        self.store = store
        self.pulse = pulse
        self.queue: asyncio.Queue[list[HeldTask] | None] = asyncio.Queue(maxsize=MAX_PENDING_POSTS)

    async def put(self, batch: list[HeldTask]) -> None:
        """A batch whose every task is POSTING (its answer set); waits while too many are queued."""
        await self.queue.put(batch)

    async def run(self) -> None:
        """``POSTERS`` loops posting queued batches, until :meth:`close` has been called and all is posted."""
        await asyncio.gather(*(self._loop() for _ in range(POSTERS)))

    async def _loop(self) -> None:
        while (batch := await self.queue.get()) is not None:
            await self.post(batch)

    async def close(self) -> None:
        """Post everything queued, then end the loops (:meth:`run` returns)."""
        for _ in range(POSTERS):
            await self.queue.put(None)

    async def post(self, tasks: list[HeldTask]) -> None:
        """Post answers, one request per job, as one retried unit; then end every task."""
        by_job: dict[int, list[HeldTask]] = {}
        for held in tasks:
            by_job.setdefault(held.job_id, []).append(held)
        errors: dict[int, BaseException | None] = {}

        async def post_one(job_id: int) -> None:
            try:
                await self.client.post_results(job_id, [item for h in by_job[job_id] for item in payload(h)])
                errors[job_id] = None
            except (AuthError, Rejected) as exc:  # retrying would not change the answer
                errors[job_id] = exc

        async def post() -> None:
            pending = [j for j in by_job if j not in errors]
            failures = [r for r in await asyncio.gather(*(post_one(j) for j in pending), return_exceptions=True) if r]
            if failures:
                raise failures[0]

        label = "post " + ", ".join(f"job {j} x{len(v)}" for j, v in by_job.items())
        bug: BaseException | None = None
        try:
            await self.orch.post(post, label, counts={job_id: len(held) for job_id, held in by_job.items()})
        except Exception as exc:  # noqa: BLE001 - retries spent for the jobs still unposted
            for job_id in by_job:
                errors.setdefault(job_id, exc)
            if not isinstance(exc, (AntennaError, *OUTAGES)):
                bug = exc  # not Antenna's answer nor an outage: after handing the tasks back, the worker stops
        for job_id, held in by_job.items():
            refused = await self.settler.after_post(job_id, held, errors[job_id])
            if refused:
                await self.isolate(job_id, refused)
        if bug is not None:
            raise bug

    async def isolate(self, job_id: int, tasks: list[HeldTask]) -> None:
        """Antenna refused a post (400): post each answer alone; a refused one is replaced by an error result.

        If Antenna refuses even that (it does not know the task), the settler terminates it:
        redelivering it could never end differently.
        """
        for held in tasks:
            assert held.result is not None
            attempts = [held.result]
            if not isinstance(held.result, PipelineResultsError):
                attempts.append(PipelineResultsError(error="result rejected by Antenna", image_id=held.r.image_id))
            for i, attempt in enumerate(attempts):
                held.result = attempt
                try:
                    await self.client.post_results(job_id, payload(held))
                    error: BaseException | None = None
                except Exception as exc:  # noqa: BLE001 - the settler decides what each error means
                    error = exc
                if await self.settler.after_single_post(held, error, last_attempt=i == len(attempts) - 1):
                    break

    async def repost(self, tasks: list[HeldTask]) -> None:
        """Answer again outside a batch (a redelivery of an image answered before: nothing to compute)."""
        await self.post(tasks)
