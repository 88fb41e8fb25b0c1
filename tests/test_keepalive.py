"""The keepalive (antenna_flows/worker/keepalive.py) on a real nats-server.

A held task gets +WPI once a third of its job's ack_wait has passed since its reservation
or its last +WPI, and so is not redelivered however long it is held; without the keepalive
NATS hands it out again after ack_wait. A task whose job has left the rotation is still
ours until it is settled, so it still gets them. Over REST there is nothing to send.
"""

from __future__ import annotations

import asyncio
import time

from antenna_flows.accounting import Ledger
from antenna_flows.antenna_client import AntennaClient
from antenna_flows.scheduler import CostModel, FairScheduler
from antenna_flows.transport import RestTransport
from antenna_flows.worker.held import HeldTask, State, TaskStore
from antenna_flows.worker.keepalive import Keepalive
from antenna_flows.worker.rotation import Rotation
from tests.helpers import PIPELINE
from tests.worker_parts import bench

FRACTION = 1 / 3  # WorkerSettings.in_progress_fraction's default


def rotation_of(*jobs: tuple[int, float]) -> Rotation:
    clock = time.monotonic
    rot = Rotation(FairScheduler(clock=clock), Ledger(worker="t", clock=clock), CostModel(), slots=1,
                   reserve_fraction=0.5, max_batch_size=8, clock=clock)
    for job_id, ack_wait_s in jobs:
        rot.join(job_id, PIPELINE, 0, ack_wait_s)
    return rot


async def hold(b, n: int, state: State) -> list[HeldTask]:
    out = []
    for r in await b.reserve(n):
        held = HeldTask(r)
        b.store.add(held, state)
        out.append(held)
    assert len(out) == n
    return out


async def test_beat_sends_plus_wpi_only_when_a_third_of_ack_wait_has_passed(nats_server):
    b = await bench(nats_server.url, 3, ack_wait_s=1.0)
    try:
        keepalive = Keepalive(b.transport, b.store, rotation_of((b.job_id, 1.0)), FRACTION, time.monotonic)
        tasks = await hold(b, 2, State.RUNNING) + await hold(b, 1, State.POSTING)
        assert await keepalive.beat() == 0  # just reserved: nothing due
        await asyncio.sleep(0.4)
        assert await keepalive.beat() == 3
        touched = [h.r.touched_at for h in tasks]
        assert all(t > h.r.reserved_at for t, h in zip(touched, tasks))
        assert await keepalive.beat() == 0  # just sent: due again a third of ack_wait later
        await asyncio.sleep(0.4)
        assert await keepalive.beat() == 3 and all(h.r.touched_at > t for t, h in zip(touched, tasks))
    finally:
        await b.close()


async def test_held_tasks_are_not_redelivered_while_held_and_are_once_the_keepalive_stops(nats_server):
    b = await bench(nats_server.url, 4, ack_wait_s=1.0)
    try:
        keepalive = Keepalive(b.transport, b.store, rotation_of((b.job_id, 1.0)), FRACTION, time.monotonic)
        await hold(b, 1, State.LOADING)
        await hold(b, 1, State.READY)
        await hold(b, 1, State.RUNNING)
        await hold(b, 1, State.POSTING)
        beating = asyncio.create_task(keepalive.run())
        await asyncio.sleep(2.6)  # more than twice ack_wait
        assert await b.reserve(10) == []  # nothing came back to anyone
        stats = await b.stats()
        assert (stats.ack_pending, stats.redelivered, stats.redeliveries) == (4, 0, 0)
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        await asyncio.sleep(1.3)  # no sign of life for ack_wait: NATS hands them out again
        again = await b.reserve(10)
        assert sorted(r.image_id for r in again) == ["1", "2", "3", "4"] and {r.num_delivered for r in again} == {2}
    finally:
        await b.close()


async def test_each_task_is_kept_alive_on_its_own_jobs_ack_wait(nats_server):
    short, long_ = await bench(nats_server.url, 1, ack_wait_s=1.0), await bench(nats_server.url, 1, ack_wait_s=30.0)
    try:
        store = TaskStore()
        long_.store = short.store = store
        keepalive = Keepalive(short.transport, store, rotation_of((short.job_id, 1.0), (long_.job_id, 30.0)),
                              FRACTION, time.monotonic)
        [s] = await hold(short, 1, State.RUNNING)
        [l] = await hold(long_, 1, State.RUNNING)
        await asyncio.sleep(0.4)
        assert await keepalive.beat() == 1  # the 1 s job's task; the 30 s job's is not due for 10 s
        assert s.r.touched_at > 0 and l.r.touched_at == 0.0
    finally:
        await short.close()
        await long_.close()


async def test_a_task_of_a_job_that_left_the_rotation_still_gets_plus_wpi(nats_server):
    """Discovery forgets a job (not listed for a while) while one of its batches is still posting:
    those tasks are held until settled, so they must not expire and be computed again elsewhere."""
    other = await bench(nats_server.url, 1, ack_wait_s=60.0)
    b = await bench(nats_server.url, 2, ack_wait_s=1.0)
    try:
        rotation = rotation_of((b.job_id, 1.0), (other.job_id, 60.0))  # the worker serves another job too
        keepalive = Keepalive(b.transport, b.store, rotation, FRACTION, time.monotonic)
        await hold(b, 2, State.POSTING)
        rotation.leave(b.job_id)
        beating = asyncio.create_task(keepalive.run())
        await asyncio.sleep(2.6)
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        assert all(h.r.touched_at > 0 for h in b.store.all())  # +WPI went out for them
        assert await b.reserve(10) == []
        assert (await b.stats()).redeliveries == 0
    finally:
        await b.close()
        await other.close()


async def test_over_rest_the_keepalive_has_nothing_to_send_and_ends(stack):
    async with AntennaClient(stack.api_url, stack.token) as client:
        keepalive = Keepalive(RestTransport(client), TaskStore(), rotation_of(), FRACTION, time.monotonic)
        await asyncio.wait_for(keepalive.run(), timeout=1.0)  # returns at once: +WPI is not a REST thing
