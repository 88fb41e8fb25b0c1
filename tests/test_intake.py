"""What happens to a task the moment it is reserved (antenna_flows/worker/intake.py), on real NATS.

New work starts downloading; a second delivery of a held image joins it; a redelivery of
an answered image is answered again (the kept answer re-posted, else recomputed), never
skipped; a malformed task naming no image is terminated.
"""

from __future__ import annotations

import asyncio

from antenna_flows.imageloader import ImageLoader
from antenna_flows.models.sim import SimModel
from antenna_flows.scheduler import FairScheduler
from antenna_flows.schemas import PipelineResultsError
from antenna_flows.worker.held import HeldTask, State
from antenna_flows.worker.intake import Intake
from tests.worker_parts import bench


def intake_for(b, loader: ImageLoader, reposted: list[list[HeldTask]]) -> Intake:
    async def repost(tasks: list[HeldTask]) -> None:
        reposted.append(tasks)

    return Intake("t", b.store, b.ledger, FairScheduler(), loader, SimModel(), b.settler, repost=repost,
                  spawn=b.spawn, clock=asyncio.get_running_loop().time)


async def answer(b, held: HeldTask) -> None:
    held.result = PipelineResultsError(error="x", image_id=held.r.image_id)
    await b.settler.settle([held], State.ANSWERED)


async def test_new_work_loads_its_image_and_becomes_ready(nats_server):
    b = await bench(nats_server.url, 2, ack_wait_s=1.0)
    loader = ImageLoader(timeout_s=1.0)  # nothing listens on port 9: the load fails fast, as a missing image would
    try:
        intake = intake_for(b, loader, [])
        intake.accept(b.job_id, await b.reserve(2))
        assert [h.state for h in b.store.all()] == [State.LOADING, State.LOADING]
        for _ in range(100):
            if all(h.state is State.READY for h in b.store.all()):
                break
            await asyncio.sleep(0.02)
        assert all(h.state is State.READY for h in b.store.all())  # a failed load is an answer too (an error)
        assert b.ledger.job(b.job_id).reserved == 2
    finally:
        await loader.aclose()
        await b.close()


async def test_redelivery_of_an_answered_image_is_answered_again_from_the_kept_answer(nats_server):
    b = await bench(nats_server.url, 1, ack_wait_s=0.5)
    loader = ImageLoader(timeout_s=1.0)
    reposted: list[list[HeldTask]] = []
    try:
        intake = intake_for(b, loader, reposted)
        intake.accept(b.job_id, await b.reserve(1))
        [first] = b.store.all()
        first.image.cancel()
        await answer(b, first)
        await asyncio.sleep(1.2)  # no Antenna acks it (a failed save): NATS redelivers after ack_wait
        again = await b.reserve(1)
        assert [r.num_delivered for r in again] == [2]
        intake.accept(b.job_id, again)
        await asyncio.gather(*b.spawned)
        [[held]] = reposted
        assert held.reanswer and held.state is State.POSTING and held.result == first.result
        assert held.image is None  # no download, no inference
        ledger = b.ledger.job(b.job_id)
        assert ledger.redelivered == 1 and ledger.recomputed == 0
    finally:
        await loader.aclose()
        await b.close()


async def test_redelivery_of_an_answer_no_longer_kept_is_recomputed(nats_server):
    b = await bench(nats_server.url, 1, ack_wait_s=0.5)
    loader = ImageLoader(timeout_s=1.0)
    try:
        b.store.answers_kept = 0
        intake = intake_for(b, loader, [])
        intake.accept(b.job_id, await b.reserve(1))
        [first] = b.store.all()
        first.image.cancel()
        await answer(b, first)
        await asyncio.sleep(1.2)
        intake.accept(b.job_id, await b.reserve(1))
        [again] = b.store.all()
        assert again.reanswer and again.state is State.LOADING  # loading its image again: computed anew
        assert b.ledger.job(b.job_id).recomputed == 1
        again.image.cancel()
    finally:
        await loader.aclose()
        await b.close()


async def test_second_delivery_while_held_joins_the_first(nats_server):
    b = await bench(nats_server.url, 1, ack_wait_s=0.5)
    loader = ImageLoader(timeout_s=1.0)
    try:
        intake = intake_for(b, loader, [])
        intake.accept(b.job_id, await b.reserve(1))
        [held] = b.store.all()
        await asyncio.sleep(1.2)  # no +WPI here: the message comes back while we still hold the image
        intake.accept(b.job_id, await b.reserve(1))
        assert len(b.store) == 1  # one inference for both deliveries
        assert [r.num_delivered for r in held.reservations()] == [1, 2]
        assert held.reply_subjects() == [held.twins[0].reply_subject]  # one message: answered on its latest delivery
        held.image.cancel()
    finally:
        await loader.aclose()
        await b.close()


async def test_a_malformed_task_naming_no_image_is_terminated(nats_server):
    b = await bench(nats_server.url, 0, ack_wait_s=0.5)
    loader = ImageLoader(timeout_s=1.0)
    try:
        await b.streams.js.publish(f"job.{b.job_id}.tasks", b"{not json")
        intake = intake_for(b, loader, [])
        [r] = await b.reserve(1)
        assert r.task is None and r.image_id is None
        intake.accept(b.job_id, [r])
        await asyncio.gather(*b.spawned)
        assert len(b.store) == 0 and b.ledger.job(b.job_id).terminated == 1
        await asyncio.sleep(0.8)
        assert await b.reserve(1) == []  # terminated: never redelivered
    finally:
        await loader.aclose()
        await b.close()
