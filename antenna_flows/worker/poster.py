"""The poster: answers to Antenna per job, in batches, then each task's ending.

A result post costs Antenna nearly as much for one result as for twenty-four (a
request, a validation, a queue push per result), so answers wait in a per-job
outbox and go in one post when any of these holds:

- the job's outbox holds ``post_batch`` answers (``antenna_api_batch_size``, 24);
- its oldest answer has waited ``max_delay_s`` (1 s; longer, up to half the wait
  Antenna's save queue would add anyway, while that queue is long);
- this worker holds nothing else of the job that could join them (a small job's
  last answers, the end of a reserved chunk: they go at once), unless Antenna's
  saves set the pace and the job has more to hand out (``may_wait``): then the
  answers would wait in Antenna's queue anyway, and the job's next chunk joins them;
- the worker is stopping.

Each post is one unit of work (recorded by the orchestrator: under Prefect,
inside a ``serve-window`` task run) retried on outages (5xx, timeouts) with
backoff and jitter; it is idempotent, so a retry after a lost response never
posts a job twice. What a post's outcome means for its tasks is the settler's
decision (:meth:`~antenna_flows.worker.settle.Settler.after_post`); a refused post
is isolated here, answer by answer, so one bad task fails alone.

At most ``POSTERS`` posts run at once (as upstream's two threads); the slots wait
while more than ``max_unposted`` answers are queued (backpressure).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from antenna_flows.accounting import Ledger
from antenna_flows.antenna_client import AntennaClient, AntennaError, AuthError, Rejected
from antenna_flows.orchestration import Orchestrator
from antenna_flows.schemas import PipelineResultsError, TaskResult
from antenna_flows.worker.base import OUTAGES, TICK_S, Pulse, wait_for
from antenna_flows.worker.held import WAITING, HeldTask, State, TaskStore
from antenna_flows.worker.settle import Settler

log = logging.getLogger(__name__)

POSTERS = 2  # result posts in flight at once (as upstream's two threads)
MAX_DELAY_CAP_S = 5.0


@dataclass
class PostPolicy:
    post_batch: int = 24  # most results in one post (upstream's antenna_api_batch_size)
    max_delay_s: float = 1.0
    max_unposted: int = 32  # answers queued before the slots wait


def payload(held: HeldTask) -> list[TaskResult]:
    assert held.result is not None
    return [TaskResult(reply_subject=subject, result=held.result) for subject in held.reply_subjects()]


class Poster:
    def __init__(self, name: str, client: AntennaClient, orchestrator: Orchestrator, settler: Settler,
                 store: TaskStore, ledger: Ledger, policy: PostPolicy, pulse: Pulse, *,
                 clock: Callable[[], float], save_delay_s: Callable[[], float] = lambda: 0.0,
                 may_wait: Callable[[int], bool] = lambda job_id: False):
        self.name = name
        self.client = client
        self.orch = orchestrator
        self.settler = settler
        self.store = store
        self.ledger = ledger
        self.policy = policy
        self.pulse = pulse
        self.clock = clock
        self.save_delay_s = save_delay_s  # how long Antenna's save queue makes an answer wait (the pacer's)
        self.may_wait = may_wait  # a job's answers may wait for its next chunk (Antenna-bound, more to come)
        self.outbox: dict[int, list[HeldTask]] = {}  # by job, oldest first
        self._changed = asyncio.Event()  # an answer arrived, a post ended
        self._room = asyncio.Event()  # a post ended: answers left for good
        self._in_flight = 0
        self._closing = False

    # --- the slots' side ----------------------------------------------------------------

    def unposted(self) -> int:
        return sum(len(tasks) for tasks in self.outbox.values())

    async def put(self, batch: list[HeldTask]) -> None:
        """A batch whose every task is POSTING (its answer set); waits while too many are unposted."""
        now = self.clock()
        for held in batch:
            held.posted_at = now
            self.outbox.setdefault(held.job_id, []).append(held)
        self._changed.set()
        while self.unposted() > self.policy.max_unposted and not self._closing:
            await wait_for(self._room, TICK_S)

    async def repost(self, tasks: list[HeldTask]) -> None:
        """Answer again outside a batch (a redelivery of an image answered before: nothing to compute)."""
        await self.put(tasks)

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Post what is due until :meth:`close` has been called and the outbox is empty."""
        posts: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._changed.clear()
                for post in [p for p in posts if p.done()]:
                    posts.discard(post)
                    post.result()  # a bug in a post fails the poster (and so the worker), loudly
                for job_id in self._due():
                    if len(posts) >= POSTERS:
                        break
                    post = asyncio.create_task(self.post(self._take(job_id)), name=f"{self.name}-post-{job_id}")
                    post.add_done_callback(lambda _: self._posted())
                    posts.add(post)
                if self._closing and not self.outbox and not posts:
                    return
                changed = asyncio.create_task(self._changed.wait())
                await asyncio.wait({changed, *posts}, timeout=self._next_deadline(),
                                   return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
        finally:
            for post in posts:
                post.cancel()

    def _posted(self) -> None:
        """A post ended: the loop may start the next, the slots may have room again."""
        self._changed.set()
        self._room.set()

    async def close(self) -> None:
        """Post everything still in the outbox now; :meth:`run` returns when all is posted."""
        self._closing = True
        self._changed.set()
        self._room.set()

    def max_delay(self) -> float:
        """``max_delay_s``, or up to half what Antenna's save queue makes answers wait anyway (at most
        MAX_DELAY_CAP_S): a post that waits a little while its answers would wait in Antenna's queue costs
        no time, and carries more answers."""
        return max(self.policy.max_delay_s, min(MAX_DELAY_CAP_S, self.save_delay_s() / 2))

    def _due(self) -> list[int]:
        """Jobs whose outbox should go now, oldest answer first."""
        now = self.clock()
        max_delay = self.max_delay()
        holding = self.store.counts(*WAITING, State.RUNNING)  # what may still join an outbox soon
        due = []
        for job_id, tasks in self.outbox.items():
            if not tasks:
                continue
            if (self._closing or len(tasks) >= self.policy.post_batch
                    or (not holding.get(job_id) and not self.may_wait(job_id))
                    or now - (tasks[0].posted_at or now) >= max_delay):
                due.append(job_id)
        return sorted(due, key=lambda j: self.outbox[j][0].posted_at or 0.0)

    def _next_deadline(self) -> float:
        oldest = [t[0].posted_at for t in self.outbox.values() if t and t[0].posted_at is not None]
        if not oldest:
            return TICK_S
        return max(0.0, min(oldest) + self.max_delay() - self.clock())

    def _take(self, job_id: int) -> list[HeldTask]:
        tasks = self.outbox[job_id]
        taken, rest = tasks[: self.policy.post_batch], tasks[self.policy.post_batch:]
        if rest:
            self.outbox[job_id] = rest
        else:
            del self.outbox[job_id]
        return taken

    # --- one post -----------------------------------------------------------------------

    async def post(self, tasks: list[HeldTask]) -> None:
        """Post answers, one request per job, as one retried unit; then end every task."""
        by_job: dict[int, list[HeldTask]] = {}
        for held in tasks:
            by_job.setdefault(held.job_id, []).append(held)
        errors: dict[int, BaseException | None] = {}

        async def post_one(job_id: int) -> None:
            try:
                self.ledger.post_made(job_id)
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
        log.debug("worker %s: %s", self.name, label)
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
                    self.ledger.post_made(job_id)
                    await self.client.post_results(job_id, payload(held))
                    error: BaseException | None = None
                except Exception as exc:  # noqa: BLE001 - the settler decides what each error means
                    error = exc
                if await self.settler.after_single_post(held, error, last_attempt=i == len(attempts) - 1):
                    break
