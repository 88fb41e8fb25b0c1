"""How a worker reaches a job's tasks (antenna_flows/transport.py), for real.

RestTransport against the local Antenna: tasks come through ``POST /jobs/{id}/tasks/``, a
404 means the job is gone (StreamGone), a malformed task is handed on with its parse error,
and nothing can be handed back or kept alive. NatsTransport on a real nats-server: nak
hands a task back after its delay, term ends it for good, +WPI keeps it ours, a lost one is
only logged, counts() reads the consumer, and new job streams are announced.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from antenna_flows.antenna_client import AntennaClient, Rejected
from antenna_flows.jetstream import MAX_TASK_ID_CHARS, ROLL_CALL_SUBJECT, JobQueue, QueueConfig, Reservation, StreamGone, stream_name, subject_name
from antenna_flows.transport import NatsTransport, RestTransport
from tests.helpers import PIPELINE
from tests.worker_parts import add_job, bench, tasks

# --- REST ----------------------------------------------------------------------------------------


async def test_rest_reserves_through_the_tasks_endpoint(stack):
    job = stack.create_job(PIPELINE, 3)
    async with AntennaClient(stack.api_url, stack.token) as client:
        rest = RestTransport(client, ack_wait_s=45.0)
        assert (rest.can_extend, rest.announces_jobs) == (False, False)
        first = await rest.reserve(job.id, 2)
        second = await rest.reserve(job.id, 5)
        assert (len(first), len(second)) == (2, 1) and await rest.reserve(job.id, 5) == []
        got = first + second
        assert sorted(r.image_id for r in got) == sorted({r.image_id for r in got}) and len(got) == 3
        for r in got:
            assert r.job_id == job.id and r.task is not None and r.parse_error is None and r.msg is None
            assert r.reply_subject.startswith("$JS.ACK.") and r.num_delivered == 1 and r.stream_seq is not None
        assert stack.request_counts()["tasks"] == 3
        assert await rest.ack_wait(job.id) == 45.0  # the configured one: REST cannot read the consumer
        assert await rest.counts(job.id) is None


async def test_rest_cannot_hand_back_keep_alive_or_terminate(stack_factory):
    stack = stack_factory(ack_wait_s=1.0, max_deliver=3)
    job = stack.create_job(PIPELINE, 1)
    async with AntennaClient(stack.api_url, stack.token) as client:
        rest = RestTransport(client)
        [r] = await rest.reserve(job.id, 1)
        await rest.nak(r, 0.0)
        await rest.term(r)
        await rest.in_progress(r)
        assert await rest.reserve(job.id, 1) == []  # not handed back by the nak
        await asyncio.sleep(1.2)
        [again] = await rest.reserve(job.id, 1)  # not kept alive, not terminated: back after ack_wait
        assert (again.image_id, again.num_delivered) == (r.image_id, 2)


async def test_rest_404_is_stream_gone_other_refusals_stay_rejections(stack):
    job = stack.create_job(PIPELINE, 1)
    async with AntennaClient(stack.api_url, stack.token) as client:
        rest = RestTransport(client)
        with pytest.raises(StreamGone) as gone:
            await rest.reserve(987_654, 1)
        assert gone.value.job_id == 987_654
        with pytest.raises(Rejected) as refused:
            await rest.reserve(job.id, 0)  # batch_size 0: Antenna's 400
        assert refused.value.status == 400 and not isinstance(refused.value, StreamGone)


async def test_rest_hands_on_a_task_with_absurd_ids_as_malformed(stack, nats_queue):
    job = stack.create_job(PIPELINE, 1)
    absurd = {"id": "7" * (MAX_TASK_ID_CHARS + 1), "image_id": "7", "image_url": "http://127.0.0.1:9/7.jpg",
              "reply_subject": None}
    await nats_queue.js.publish(subject_name(job.id), json.dumps(absurd).encode(), stream=stream_name(job.id))
    async with AntennaClient(stack.api_url, stack.token) as client:
        got = await RestTransport(client).reserve(job.id, 5)
    assert len(got) == 2
    [bad] = [r for r in got if r.task is None]
    [good] = [r for r in got if r.task is not None]
    assert f"id of {MAX_TASK_ID_CHARS + 1} characters" in (bad.parse_error or "")
    assert bad.reply_subject.startswith("$JS.ACK.") and bad.image_id is None  # answered by its stream sequence
    assert good.parse_error is None


# --- NATS ----------------------------------------------------------------------------------------


async def test_nak_hands_a_task_back_after_its_delay(nats_server):
    b = await bench(nats_server.url, 2, ack_wait_s=30.0)
    try:
        one, two = await b.reserve(2)
        await b.transport.nak(one, 0.3)
        assert await b.reserve(5) == []  # not before the delay
        await asyncio.sleep(0.5)
        [back] = await b.reserve(5)
        assert (back.image_id, back.num_delivered) == (one.image_id, 2)
        assert (await b.stats()).ack_pending == 2  # the other one is still ours
    finally:
        await b.close()


async def test_term_ends_a_task_for_good_an_untouched_one_comes_back(nats_server):
    b = await bench(nats_server.url, 2, ack_wait_s=0.5)
    try:
        one, two = await b.reserve(2)
        await b.transport.term(one)
        await asyncio.sleep(0.9)
        again = await b.reserve(5)
        assert [(r.image_id, r.num_delivered) for r in again] == [(two.image_id, 2)]
        stats = await b.stats()
        assert stats.ack_pending == 1 and stats.done == 1  # the terminated one no longer awaits an ack
    finally:
        await b.close()


async def test_in_progress_keeps_a_task_ours_past_ack_wait(nats_server):
    b = await bench(nats_server.url, 1, ack_wait_s=0.5)
    try:
        [r] = await b.reserve(1)
        for _ in range(7):  # 1.4 s, almost three ack_waits
            await asyncio.sleep(0.2)
            await b.transport.in_progress(r)
        assert await b.reserve(1) == []
        assert (await b.stats()).redeliveries == 0
    finally:
        await b.close()


async def test_a_lost_plus_wpi_is_logged_never_raised_and_a_rest_reservation_sends_nothing(nats_server, caplog):
    b = await bench(nats_server.url, 1, ack_wait_s=30.0)
    other = NatsTransport(await JobQueue.connect(nats_server.url, QueueConfig(), name="test-closing"))
    try:
        [r] = await other.reserve(b.job_id, 1)
        await other.close()
        with caplog.at_level(logging.WARNING, logger="antenna_flows.transport"):
            await other.in_progress(r)
            await other.nak(r, 0.1)
        assert f"job {b.job_id}: in_progress of task {r.image_id} failed" in caplog.text
        assert f"job {b.job_id}: nak of task {r.image_id} failed" in caplog.text
        rest_shaped = Reservation(job_id=b.job_id, task=tasks(1)[0], parse_error=None, reply_subject="x")
        for send in (b.transport.in_progress(rest_shaped), b.transport.nak(rest_shaped, 0.1),
                     b.transport.term(rest_shaped)):
            await send  # no message to answer on: nothing sent, nothing raised
    finally:
        await b.close()


async def test_counts_read_the_consumer_and_a_deleted_job_is_stream_gone(nats_server):
    b = await bench(nats_server.url, 5, ack_wait_s=1.0, max_deliver=4)
    try:
        assert b.transport.can_extend and b.transport.announces_jobs
        before = await b.transport.counts(b.job_id)
        assert (before.messages, before.pending, before.ack_pending, before.delivered_msgs) == (5, 5, 0, 0)
        assert (before.ack_wait_s, before.max_deliver) == (1.0, 4)
        one, *_ = await b.reserve(2)
        await b.transport.term(one)
        await asyncio.sleep(0.05)
        after = await b.transport.counts(b.job_id)
        assert (after.pending, after.ack_pending, after.delivered_msgs, after.done) == (3, 1, 2, 1)
        assert await b.transport.ack_wait(b.job_id) == 1.0  # Antenna's, read from its consumer
        await b.streams.delete_job(b.job_id)
        for call in (b.transport.reserve(b.job_id, 1), b.transport.ack_wait(b.job_id), b.transport.counts(b.job_id)):
            with pytest.raises(StreamGone):
                await call
    finally:
        await b.close()


async def test_new_job_streams_are_announced(nats_server):
    b = await bench(nats_server.url, 0)
    announced: list[int] = []
    later = None
    try:
        await b.transport.watch_new_jobs(announced.append)
        later = await add_job(b, tasks(1))
        for _ in range(100):
            if later in announced:
                break
            await asyncio.sleep(0.01)
        assert later in announced
    finally:
        if later is not None:
            await b.streams.delete_job(later)
        await b.close()


async def test_the_roll_call_carries_what_each_worker_holds(nats_server):
    b = await bench(nats_server.url, 0)
    heard: list[tuple[str, list[str], int | None]] = []
    try:
        await b.transport.watch_roll_call(lambda w, p, h: heard.append((w, p, h)))
        await b.transport.announce("w1", ["p"], 17)
        await b.transport.announce("w2", ["p"])  # a worker that does not say what it holds
        await b.transport.queue.nc.publish(ROLL_CALL_SUBJECT, b"not json")  # noise on the subject: ignored
        for _ in range(100):
            if len(heard) >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert heard == [("w1", ["p"], 17), ("w2", ["p"], None)]
    finally:
        await b.close()
