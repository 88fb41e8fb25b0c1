"""How a task ends (antenna_flows/worker/settle.py), read back from a real nats-server.

answered: one last +WPI, never an ack (Antenna acks after its save); released: nak, so
NATS hands it out again soon; terminated: never again; dropped: nothing sent. And what a
result post's final error means for its tasks.
"""

from __future__ import annotations

import asyncio

from antenna_flows.antenna_client import AuthError, Rejected, Unavailable
from antenna_flows.schemas import PipelineResultsError
from antenna_flows.worker.held import HeldTask, State
from tests.worker_parts import bench


async def held_tasks(b, n: int, state: State = State.POSTING) -> list[HeldTask]:
    out = []
    for r in await b.reserve(n):
        held = HeldTask(r)
        held.result = PipelineResultsError(error="x", image_id=r.image_id)
        b.store.add(held, state)
        out.append(held)
    return out


async def test_answered_is_never_acked_and_antenna_gets_a_full_ack_wait_to_save(nats_server):
    b = await bench(nats_server.url, 2, ack_wait_s=1.0)
    try:
        tasks = await held_tasks(b, 2)
        await asyncio.sleep(0.7)
        await b.settler.settle(tasks, State.ANSWERED)
        assert len(b.store) == 0 and b.store.answered((b.job_id, "1")) and b.store.answer_of((b.job_id, "2"))
        assert b.ledger.job(b.job_id).errors == 2  # error results count as answered with errors
        await asyncio.sleep(0.6)  # 1.3 s after the reservation, 0.6 s after the last +WPI: not redelivered
        assert (await b.stats()).ack_pending == 2 and await b.reserve(5) == []
        await asyncio.sleep(0.8)  # nobody acked (no Antenna here): NATS hands them out again
        again = await b.reserve(5)
        assert sorted(r.image_id for r in again) == ["1", "2"] and {r.num_delivered for r in again} == {2}
    finally:
        await b.close()


async def test_released_comes_back_after_the_nak_delay_terminated_never(nats_server):
    b = await bench(nats_server.url, 4, ack_wait_s=30.0)
    try:
        tasks = await held_tasks(b, 4, State.READY)
        assert await b.settler.settle(tasks[:2], State.RELEASED, "stop") == 2
        assert await b.settler.settle(tasks[2:], State.TERMINATED, "poison") == 2
        assert await b.settler.settle(tasks, State.RELEASED) == 0  # already ended: nothing happens twice
        await asyncio.sleep(0.3)  # past the jittered 0.05-0.1 s nak delay, long before ack_wait
        back = await b.reserve(10)
        assert sorted(r.image_id for r in back) == ["1", "2"]
        stats = await b.stats()
        assert stats.ack_pending == 2  # the two taken again; the terminated ones are gone for good
        ledger = b.ledger.job(b.job_id)
        assert (ledger.released, ledger.terminated) == (2, 2)
    finally:
        await b.close()


async def test_dropped_sends_nothing(nats_server):
    b = await bench(nats_server.url, 2, ack_wait_s=30.0)
    try:
        tasks = await held_tasks(b, 2, State.READY)
        assert await b.settler.drop_job(b.job_id, "stream gone") == 2
        await asyncio.sleep(0.2)
        assert await b.reserve(5) == [] and (await b.stats()).ack_pending == 2
        assert b.ledger.job(b.job_id).dropped == 2 and len(b.store) == 0
    finally:
        await b.close()


async def test_what_a_posts_final_error_means_for_its_tasks(nats_server):
    b = await bench(nats_server.url, 8, ack_wait_s=30.0)
    try:
        t = await held_tasks(b, 8)
        assert await b.settler.after_post(b.job_id, t[0:2], None) == [] and b.ledger.job(b.job_id).errors == 2
        assert await b.settler.after_post(b.job_id, t[2:3], Unavailable("503 after retries")) == []
        assert await b.settler.after_post(b.job_id, t[3:4], Rejected(404, "gone", "POST /x")) == []
        refused = await b.settler.after_post(b.job_id, t[4:6], Rejected(400, "bad", "POST /x"))
        assert refused == t[4:6] and all(h.state is State.POSTING for h in refused)  # posted one by one next
        assert not b.fatal
        assert await b.settler.after_post(b.job_id, t[6:7], AuthError("401")) == []
        assert len(b.fatal) == 1 and "token" in str(b.fatal[0])  # the worker stops
        ledger = b.ledger.job(b.job_id)
        assert (ledger.released, ledger.dropped) == (2, 1)
        # isolating: refused alone and not the last attempt -> not ended yet; last attempt -> terminated
        assert not await b.settler.after_single_post(t[4], Rejected(400, "bad", "POST /x"), last_attempt=False)
        assert await b.settler.after_single_post(t[4], Rejected(400, "bad", "POST /x"), last_attempt=True)
        assert t[4].state is State.TERMINATED
        assert await b.settler.after_single_post(t[5], None, last_attempt=False) and t[5].state is State.ANSWERED
    finally:
        await b.close()
