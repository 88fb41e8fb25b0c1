"""How a worker stops: in a written order, and loudly when one of its parts fails.

Against a real nats-server and the local Antenna. The order (antenna_flows/worker/core.py):
stop reserving, hand back what has not started, finish the batch in flight, post its answers,
keep +WPI going until the last held task is settled. A part that dies of an unexpected
exception stops the worker with an error after handing everything back, so a supervisor
replaces it and nothing is lost.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from antenna_flows.models.sim import SimModel
from antenna_flows.worker import FairWorker, PartFailed
from antenna_flows.worker.held import State
from tests.helpers import PIPELINE, all_answered, serve_until, settings_for, worker_for


class GatedSim(SimModel):
    """The sim model, whose second batch waits for the test to open a gate (a batch "in flight")."""

    def __init__(self, *args: float):
        super().__init__(*args)
        self.batches = 0
        self.in_flight = threading.Event()
        self.gate = threading.Event()

    def predict(self, pipeline, images):  # type: ignore[no-untyped-def]
        self.batches += 1
        if self.batches == 2:
            self.in_flight.set()
            self.gate.wait(10)
        return super().predict(pipeline, images)


async def test_stop_order_hands_back_first_finishes_the_batch_posts_it_and_keeps_held_tasks_alive(stack, aadmin):
    job = stack.create_job(PIPELINE, 40, job_id=950)
    settings = settings_for(stack, max_batch_size=4, prefetch_batches=2, sim_seconds_per_image=0.01)
    model = GatedSim(settings.sim_seconds_per_image, settings.sim_seconds_per_batch)
    worker = FairWorker(settings, model)
    events: list[tuple[str, Any]] = []
    real_settle = worker.store.settle

    def record_settle(held, outcome):  # type: ignore[no-untyped-def]
        events.append((outcome.value, held.job_id))
        real_settle(held, outcome)

    worker.store.settle = record_settle  # type: ignore[method-assign]
    run = asyncio.create_task(worker.run())
    await asyncio.get_running_loop().run_in_executor(None, model.in_flight.wait, 10)
    while len(events) < 4:  # the first batch's answers are accepted
        await asyncio.sleep(0.01)
    running = len(list(worker.store.all(State.RUNNING)))
    waiting = len(list(worker.store.all(State.RESERVED, State.LOADING, State.READY)))
    assert running == 4 and waiting >= 1
    before = len(events)  # the first batch's answers
    worker.stop("test")
    # 1 + 2: reserving stops and what has not started goes back at once, while the batch still runs
    for _ in range(100):
        if not worker.store.waiting_counts():
            break
        await asyncio.sleep(0.02)
    assert not worker.store.waiting_counts()
    assert [e for e, _ in events[before:]] == ["released"] * waiting
    assert len(list(worker.store.all(State.RUNNING))) == 4  # the batch in flight is still ours
    keepalive = worker._running.get("keepalive")
    assert keepalive is not None and not keepalive.done()  # +WPI goes on while tasks are held
    # 3 + 4: the batch finishes and its answers are posted and accepted; then the run ends
    model.gate.set()
    totals = await asyncio.wait_for(run, 20)
    assert [e for e, _ in events[before + waiting:]] == ["answered"] * 4
    assert len(worker.store) == 0
    assert totals["images"] == 4 + 4  # the first batch and the one in flight, nothing else
    assert keepalive.done()  # 5: ended only after the last task was settled
    # nothing lost: what was handed back is answered by the next worker
    other = worker_for(settings_for(stack, worker_name="next"))
    await serve_until([other], all_answered(aadmin, job.id))
    final = await aadmin.job(job.id)
    assert (final.results, final.duplicates) == (40, 0)


class BrokenRotation(Exception):
    """What a bug looks like to the worker: an exception nobody planned for."""


async def test_a_part_that_fails_stops_the_worker_loudly_and_hands_everything_back(stack, aadmin, caplog):
    job = stack.create_job(PIPELINE, 30, job_id=951)
    worker = worker_for(settings_for(stack, max_batch_size=4, prefetch_batches=3, sim_seconds_per_image=0.02))
    run = asyncio.create_task(worker.run())
    while worker.ledger.job(job.id).images < 4 or not worker.store.waiting_counts():
        await asyncio.sleep(0.01)
    held_before = len(worker.store)
    assert held_before > 0
    # the reserver's next round meets a bug
    assert worker.parts is not None

    async def broken_round() -> None:
        raise BrokenRotation("rotation state corrupted")

    worker.parts.reserver.round = broken_round  # type: ignore[method-assign]
    worker.pulse.reserve.set()
    with pytest.raises(PartFailed) as failed:
        await asyncio.wait_for(run, 20)
    assert failed.value.part == "reserver" and isinstance(failed.value.cause, BrokenRotation)
    assert "part reserver failed" in caplog.text  # loudly: the traceback is logged
    assert len(worker.store) == 0  # everything held was answered or handed back
    rows = worker.ledger.job(job.id)
    assert rows.released > 0
    # a replacement worker (what a supervisor starts) answers the rest: nothing lost, nothing doubled
    other = worker_for(settings_for(stack, worker_name="replacement"))
    await serve_until([other], all_answered(aadmin, job.id))
    final = await aadmin.job(job.id)
    assert (final.results, final.errors, final.duplicates) == (30, 0, 0)


async def test_a_failing_keepalive_stops_the_worker_too(stack, aadmin):
    """+WPI is what keeps held tasks ours: without it the worker must not go on holding them."""
    job = stack.create_job(PIPELINE, 20, job_id=952)
    worker = worker_for(settings_for(stack, max_batch_size=4, sim_seconds_per_image=0.02))
    run = asyncio.create_task(worker.run())
    while worker.ledger.job(job.id).images < 4:
        await asyncio.sleep(0.01)
    assert worker.parts is not None

    async def broken_beat() -> int:
        raise RuntimeError("keepalive bug")

    worker.parts.keepalive.beat = broken_beat  # type: ignore[method-assign]
    with pytest.raises(PartFailed) as failed:
        await asyncio.wait_for(run, 20)
    assert failed.value.part == "keepalive"
    assert len(worker.store) == 0
    other = worker_for(settings_for(stack, worker_name="replacement"))
    await serve_until([other], all_answered(aadmin, job.id))
    final = await aadmin.job(job.id)
    assert (final.results, final.duplicates) == (20, 0)
