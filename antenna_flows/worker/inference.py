"""The slot: the GPU's batches, one at a time, in fair order, inside inference sessions.

A session (a Prefect subflow run under Prefect) runs batches and hands each to
the posters until the slot has been idle ``session_idle_s``, has run
``session_max_s``, or the worker stops. A batch takes ready tasks of one
pipeline from any number of jobs, as the fair scheduler picks them; if it is
thin while images are still loading it waits up to ``batch_fill_wait_s`` for a
fuller one (dynamic batching). Each job is charged its measured share of the
slot seconds, so fairness is in GPU time, not task counts.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from antenna_flows.imageloader import ImageError
from antenna_flows.models.base import ImageInput, UnknownPipeline
from antenna_flows.schemas import PipelineResultsError
from antenna_flows.worker import poster
from antenna_flows.worker.base import TICK_S, wait_for
from antenna_flows.worker.held import HeldTask, Result, State
from antenna_flows.worker.reserver import batch_limit, urgent

if TYPE_CHECKING:
    from antenna_flows.worker.core import FairWorker

log = logging.getLogger(__name__)


@dataclass
class RunningBatch:
    pipeline: str
    size: int
    started: float


async def session(w: "FairWorker") -> dict[str, Any]:
    """One inference session: run batches and post them until idle, too long, or stopping."""
    started = w.clock()
    before = w.ledger.totals()
    w.ready("session")
    posting = poster.Posters(w)
    deadline = started + w.settings.session_max_s
    try:
        await asyncio.gather(*(_run_batches(w, posting, deadline, i) for i in range(w.settings.slots)))
    finally:
        await posting.close()
    after = w.ledger.totals()
    return {
        "session": w.sessions,
        "seconds": round(w.clock() - started, 3),
        "batches": after["batches"] - before["batches"],
        "images": after["images"] - before["images"],
        "errors": after["errors"] - before["errors"],
        "jobs": sorted(w.jobs),
    }


async def _run_batches(w: "FairWorker", posting: "poster.Posters", deadline: float, index: int) -> None:
    """One slot's loop (``slots`` of them share the store; taking a batch never awaits, so none overlap)."""
    idle_since = w.clock()
    thin_since: float | None = None  # when the slot last found too little ready to fill a batch
    while not w.stopping.is_set() and w.clock() < deadline:
        ready = w.store.ready_counts()
        loading = sum(w.store.counts(State.RESERVED, State.LOADING).values())
        if ready and loading and sum(ready.values()) < batch_limit(w):
            # Dynamic batching: wait a moment for images still loading rather than run a thin batch.
            thin_since = thin_since if thin_since is not None else w.clock()
            left = w.settings.batch_fill_wait_s - (w.clock() - thin_since)
            if left > 0:
                await wait_for(w.pool_changed, left)
                continue
        thin_since = None
        if not ready:
            if not w.store.waiting_counts() and w.clock() - idle_since > w.settings.session_idle_s:
                return
            await wait_for(w.pool_changed, TICK_S)  # reserved tasks arrive, or their images finish loading
            continue
        pipeline, counts = w.scheduler.select_batch(ready, batch_limit(w), w.cost.per_image, urgent(w))
        if not counts or pipeline is None:
            await asyncio.sleep(0.01)
            continue
        batch = [held for job_id, n in counts.items() for held in w.store.take_ready(job_id, n)]
        await run_batch(w, pipeline, counts, batch, index)
        await posting.put(batch)
        w.maybe_report()
        idle_since = w.clock()


async def run_batch(w: "FairWorker", pipeline: str, counts: dict[int, int], batch: list[HeldTask],
                    index: int = 0) -> None:
    """Run one batch on slot ``index``; every task leaves with ``held.result`` set and state POSTING."""
    w.running[index] = RunningBatch(pipeline, len(batch), w.clock())
    executor = w.inference[index]
    w.wake_reserver.set()  # room in the pool: reserve the batch after this one now
    loop = asyncio.get_running_loop()
    inputs: list[tuple[HeldTask, ImageInput]] = []
    for held in batch:
        image_or_error = await _image_of(w, held)
        if isinstance(image_or_error, PipelineResultsError):
            held.result = image_or_error
        else:
            assert held.r.task is not None
            inputs.append((held, ImageInput(held.r.task, image_or_error)))
    if pipeline not in w.loaded and inputs:
        try:
            await loop.run_in_executor(executor, w.model.load, pipeline)
            w.loaded.add(pipeline)
        except UnknownPipeline:
            log.warning("worker %s: pipeline %r is unknown to model %s: %d error results", w.name, pipeline,
                        w.model.kind, len(inputs))
            for held, item in inputs:
                held.result = PipelineResultsError(error=f"unknown pipeline {pipeline!r}", image_id=item.task.image_id)
            inputs = []
    ticket = w.scheduler.start_batch(pipeline, counts, w.cost.per_image)
    started = w.clock()
    idle = {}
    for held in batch:
        idle[held.job_id] = max(idle.get(held.job_id, 0.0), started - held.r.reserved_at)
    if inputs:
        outputs = await _predict(w, executor, pipeline, [item for _, item in inputs])
        for (held, _), output in zip(inputs, outputs):
            held.result = output
    seconds = w.clock() - started
    del w.running[index]
    shares = w.scheduler.finish_batch(ticket, seconds)
    if inputs:
        w.cost.observe(pipeline, len(inputs), seconds)
    w.ledger.batch(shares, counts, idle)
    for held in batch:
        w.store.move(held, State.POSTING)
    w.metrics.write(pipeline, seconds, counts, max(idle.values(), default=0.0))


async def _image_of(w: "FairWorker", held: HeldTask) -> Any:
    """The decoded image of a task, or the error result that answers it instead."""
    r = held.r
    if r.task is None:
        log.warning("worker %s: job %s: %s (delivery %d): answering with an error result",
                    w.name, r.job_id, r.parse_error, r.num_delivered)
        return PipelineResultsError(error=r.parse_error or "malformed task", image_id=r.image_id)
    image, held.image = held.image, None
    try:
        assert image is not None
        return await image
    except ImageError as exc:
        log.warning("worker %s: job %s image %s: %s", w.name, r.job_id, r.task.image_id, exc)
        return PipelineResultsError(error=str(exc), image_id=r.task.image_id)
    except Exception as exc:  # noqa: BLE001
        return PipelineResultsError(error=f"image load failed: {exc!r}", image_id=r.task.image_id)


async def _predict(w: "FairWorker", executor: Executor, pipeline: str, inputs: list[ImageInput]) -> list[Result]:
    """Run the batch; if the batch as a whole fails, retry image by image so one bad input fails alone."""
    loop = asyncio.get_running_loop()
    try:
        return list(await loop.run_in_executor(executor, w.model.predict, pipeline, inputs))
    except Exception as exc:  # noqa: BLE001
        log.warning("worker %s: batch of %d (%s) failed: %r; retrying image by image", w.name, len(inputs), pipeline, exc)
    outputs: list[Result] = []
    for item in inputs:
        try:
            outputs.extend(await loop.run_in_executor(executor, w.model.predict, pipeline, [item]))
        except Exception as exc:  # noqa: BLE001
            outputs.append(PipelineResultsError(error=f"inference failed: {exc!r}", image_id=item.task.image_id))
    return outputs
