"""Inference: the GPU's batches on ``slots`` inference slots, in fair order, inside inference sessions.

A session (a Prefect subflow run under Prefect) runs batches and hands each to
the poster until the slots have been idle ``session_idle_s``, have run
``session_max_s``, or the worker stops. A batch takes ready tasks of one
pipeline from any number of jobs, as the fair scheduler picks them; if it is
thin while images are still loading it waits up to ``batch_fill_wait_s`` for a
fuller one (dynamic batching). Each job is charged its measured share of the
slot seconds, so fairness is in GPU time, not task counts.

Each slot has its own thread, so ``slots`` batches can be in flight on one GPU
(one on the device while the CPU turns another into results).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from antenna_flows.accounting import BatchLog, Ledger
from antenna_flows.imageloader import ImageError
from antenna_flows.models.base import ImageInput, Model, UnknownPipeline
from antenna_flows.scheduler import FairScheduler
from antenna_flows.schemas import PipelineResultsError
from antenna_flows.worker.base import TICK_S, Pulse, wait_for
from antenna_flows.worker.held import HeldTask, Result, State, TaskStore
from antenna_flows.worker.reserver import urgent_tasks
from antenna_flows.worker.rotation import Rotation

log = logging.getLogger(__name__)


@dataclass
class InferencePolicy:
    """How batches are formed and sessions bounded (from WorkerSettings)."""

    slots: int = 1
    max_batch_size: int = 8
    batch_fill_wait_s: float = 0.05
    session_idle_s: float = 60.0
    session_max_s: float = 600.0


@dataclass
class RunningBatch:
    pipeline: str
    size: int
    started: float


class Inference:
    def __init__(self, name: str, model: Model, store: TaskStore, rotation: Rotation, scheduler: FairScheduler,
                 ledger: Ledger, metrics: BatchLog, policy: InferencePolicy, pulse: Pulse, *,
                 hand_over: Callable[[list[HeldTask]], Awaitable[None]],
                 after_batch: Callable[[], None] = lambda: None):
        self.name = name
        self.model = model
        self.store = store
        self.rotation = rotation
        self.scheduler = scheduler
        self.ledger = ledger
        self.metrics = metrics
        self.policy = policy
        self.pulse = pulse
        self.hand_over = hand_over  # a finished batch goes to the poster (may wait: backpressure)
        self.after_batch = after_batch
        self.clock = rotation.clock
        self.threads = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slot{i}-{name}")
                        for i in range(policy.slots)]
        self.running: dict[int, RunningBatch] = {}  # by slot
        self.loaded: set[str] = set()
        self.sessions = 0

    def close(self) -> None:
        for executor in self.threads:
            executor.shutdown(wait=False, cancel_futures=True)

    def busy_for_s(self) -> float:
        """How long until a slot frees: 0 if one is idle, else the soonest expected end of a running batch."""
        if len(self.running) < self.policy.slots:
            return 0.0
        now = self.clock()
        cost = self.rotation.cost
        return max(0.0, min(b.size * cost.per_image(b.pipeline) - (now - b.started) for b in self.running.values()))

    # --- models -------------------------------------------------------------------------

    async def load(self, pipeline: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self.threads[0], self.model.load, pipeline)
        self.loaded.add(pipeline)

    async def time_one(self, pipeline: str, item: ImageInput) -> float:
        """Seconds one image takes on slot 0 (the warm-up that seeds the cost model)."""
        started = self.clock()
        await asyncio.get_running_loop().run_in_executor(self.threads[0], self.model.predict, pipeline, [item])
        return self.clock() - started

    # --- sessions -----------------------------------------------------------------------

    async def session(self) -> dict[str, Any]:
        """One inference session: run batches on every slot until idle, too long, or stopping."""
        self.sessions += 1
        started = self.clock()
        before = self.ledger.totals()
        deadline = started + self.policy.session_max_s
        await asyncio.gather(*(self._slot(deadline, i) for i in range(self.policy.slots)))
        after = self.ledger.totals()
        return {
            "session": self.sessions,
            "seconds": round(self.clock() - started, 3),
            "batches": after["batches"] - before["batches"],
            "images": after["images"] - before["images"],
            "errors": after["errors"] - before["errors"],
            "jobs": self.rotation.ids(),
        }

    async def _slot(self, deadline: float, index: int) -> None:
        """One slot's loop (``slots`` of them share the store; taking a batch never awaits, so none overlap)."""
        idle_since = self.clock()
        thin_since: float | None = None  # when the slot last found too little ready to fill a batch
        while not self.pulse.stopping.is_set() and self.clock() < deadline:
            ready = self.store.ready_counts()
            loading = sum(self.store.counts(State.RESERVED, State.LOADING).values())
            if ready and loading and sum(ready.values()) < self.rotation.batch_limit():
                # Dynamic batching: wait a moment for images still loading rather than run a thin batch.
                thin_since = thin_since if thin_since is not None else self.clock()
                left = self.policy.batch_fill_wait_s - (self.clock() - thin_since)
                if left > 0:
                    await wait_for(self.pulse.tasks, left)
                    continue
            thin_since = None
            if not ready:
                if not self.store.waiting_counts() and self.clock() - idle_since > self.policy.session_idle_s:
                    return
                await wait_for(self.pulse.tasks, TICK_S)  # reserved tasks arrive, or their images finish loading
                continue
            urgent = urgent_tasks(self.store, self.rotation, self.policy.max_batch_size)
            pipeline, counts = self.scheduler.select_batch(ready, self.rotation.batch_limit(),
                                                           self.rotation.cost.per_image, urgent)
            if not counts or pipeline is None:
                await asyncio.sleep(0.01)
                continue
            batch = [held for job_id, n in counts.items() for held in self.store.take_ready(job_id, n)]
            await self.run_batch(pipeline, counts, batch, index)
            await self.hand_over(batch)
            self.after_batch()
            idle_since = self.clock()

    # --- one batch ----------------------------------------------------------------------

    async def run_batch(self, pipeline: str, counts: dict[int, int], batch: list[HeldTask], index: int = 0) -> None:
        """Run one batch on slot ``index``; every task leaves with ``held.result`` set and state POSTING."""
        self.running[index] = RunningBatch(pipeline, len(batch), self.clock())
        executor = self.threads[index]
        self.pulse.reserve.set()  # room in the pool: reserve the batch after this one now
        inputs: list[tuple[HeldTask, ImageInput]] = []
        for held in batch:
            image_or_error = await self._image_of(held)
            if isinstance(image_or_error, PipelineResultsError):
                held.result = image_or_error
            else:
                assert held.r.task is not None
                inputs.append((held, ImageInput(held.r.task, image_or_error)))
        if pipeline not in self.loaded and inputs:
            try:
                await asyncio.get_running_loop().run_in_executor(executor, self.model.load, pipeline)
                self.loaded.add(pipeline)
            except UnknownPipeline:
                log.warning("worker %s: pipeline %r is unknown to model %s: %d error results", self.name, pipeline,
                            self.model.kind, len(inputs))
                for held, item in inputs:
                    held.result = PipelineResultsError(error=f"unknown pipeline {pipeline!r}",
                                                       image_id=item.task.image_id)
                inputs = []
        ticket = self.scheduler.start_batch(pipeline, counts, self.rotation.cost.per_image)
        started = self.clock()
        idle: dict[int, float] = {}
        for held in batch:
            idle[held.job_id] = max(idle.get(held.job_id, 0.0), started - held.r.reserved_at)
        if inputs:
            outputs = await self._predict(executor, pipeline, [item for _, item in inputs])
            for (held, _), output in zip(inputs, outputs):
                held.result = output
        seconds = self.clock() - started
        del self.running[index]
        shares = self.scheduler.finish_batch(ticket, seconds)
        if inputs:
            self.rotation.cost.observe(pipeline, len(inputs), seconds)
        self.ledger.batch(shares, counts, idle)
        for held in batch:
            self.store.move(held, State.POSTING)
        self.metrics.write(pipeline, seconds, counts, max(idle.values(), default=0.0))

    async def _image_of(self, held: HeldTask) -> Any:
        """The decoded image of a task, or the error result that answers it instead."""
        r = held.r
        if r.task is None:
            log.warning("worker %s: job %s: %s (delivery %d): answering with an error result",
                        self.name, r.job_id, r.parse_error, r.num_delivered)
            return PipelineResultsError(error=r.parse_error or "malformed task", image_id=r.image_id)
        image, held.image = held.image, None
        try:
            assert image is not None
            return await image
        except ImageError as exc:
            log.warning("worker %s: job %s image %s: %s", self.name, r.job_id, r.task.image_id, exc)
            return PipelineResultsError(error=str(exc), image_id=r.task.image_id)
        except Exception as exc:  # noqa: BLE001 - any failure to load is that image's error result
            return PipelineResultsError(error=f"image load failed: {exc!r}", image_id=r.task.image_id)

    async def _predict(self, executor: Executor, pipeline: str, inputs: list[ImageInput]) -> list[Result]:
        """Run the batch; if the batch as a whole fails, retry image by image so one bad input fails alone."""
        loop = asyncio.get_running_loop()
        try:
            return list(await loop.run_in_executor(executor, self.model.predict, pipeline, inputs))
        except Exception as exc:  # noqa: BLE001
            log.warning("worker %s: batch of %d (%s) failed: %r; retrying image by image", self.name, len(inputs),
                        pipeline, exc)
        outputs: list[Result] = []
        for item in inputs:
            try:
                outputs.extend(await loop.run_in_executor(executor, self.model.predict, pipeline, [item]))
            except Exception as exc:  # noqa: BLE001
                outputs.append(PipelineResultsError(error=f"inference failed: {exc!r}", image_id=item.task.image_id))
        return outputs
