"""Antenna's JetStream layout and the queue operations on it, against the session's real nats-server."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import AsyncIterator

import pytest

from antenna_lab.antenna.streams import JobStreams
from antenna_flows.jetstream import (
    ADVISORY_STREAM,
    QueueConfig,
    StreamGone,
    consumer_name,
    dlq_name,
    max_deliveries_subject,
    parse_ack_subject,
    stream_name,
    subject_name,
)
from antenna_flows.schemas import PipelineProcessingTask

_ids = itertools.count(90_000)  # clear of the API tests' job ids on the shared server


def tasks(n: int) -> list[PipelineProcessingTask]:
    return [PipelineProcessingTask(id=str(i), image_id=str(i), image_url=f"http://x/{i}.jpg") for i in range(n)]


@pytest.fixture
async def queue(nats_queue: JobStreams) -> AsyncIterator[JobStreams]:
    """A queue on the session server whose new jobs get ack_wait 1 s and max_deliver 2."""
    yield JobStreams(nats_queue.nc, QueueConfig(ack_wait_s=1.0, max_deliver=2, max_ack_pending=100))


async def new_job(queue: JobStreams, n: int) -> tuple[int, list[int]]:
    job_id = next(_ids)
    await queue.delete_job(job_id)
    await queue.create_job(job_id)
    return job_id, await queue.publish_tasks(job_id, tasks(n))


def test_parse_ack_subject_both_forms() -> None:
    v1 = parse_ack_subject("$JS.ACK.job_5.job-5-consumer.2.17.40.1795886839270255728.3")
    assert (v1.stream, v1.consumer, v1.num_delivered, v1.stream_seq, v1.consumer_seq) == ("job_5", "job-5-consumer", 2, 17, 40)
    v2 = parse_ack_subject("$JS.ACK.hub.ACCHASH.job_5.job-5-consumer.1.3.4.1795886839270255728.0.tok")
    assert (v2.stream, v2.num_delivered, v2.stream_seq) == ("job_5", 1, 3)
    for bad in ("", "inbox.1", "$JS.ACK.job_5.c.x.1.1.1.0", "$JS.ACK.a.b.c.d.e.f.g.h.i.j", "$JS.API.a.b.1.1.1.1.0"):
        assert parse_ack_subject(bad) is None, bad


async def test_create_job_builds_antennas_layout_idempotently(queue: JobStreams) -> None:
    job_id, seqs = await new_job(queue, 3)
    await queue.create_job(job_id)  # again: nothing changes
    assert seqs == [1, 2, 3]
    stream = await queue.js.stream_info(stream_name(job_id))
    assert stream.config.subjects == [subject_name(job_id)] and stream.config.max_age == 24 * 3600
    consumer = await queue.js.consumer_info(stream_name(job_id), consumer_name(job_id))
    assert (consumer.config.ack_wait, consumer.config.max_deliver, consumer.config.max_ack_pending) == (1.0, 2, 100)
    assert consumer.config.filter_subject == subject_name(job_id) and consumer.num_pending == 3
    dlq = await queue.js.consumer_info(ADVISORY_STREAM, dlq_name(job_id))
    assert dlq.config.filter_subject == max_deliveries_subject(job_id)
    assert job_id in await queue.job_streams()
    assert (await queue.get_task(job_id, 2)).image_id == "1"


async def test_fetch_ack_and_stats(queue: JobStreams) -> None:
    job_id, _ = await new_job(queue, 3)
    msgs = await queue.fetch(job_id, 2)
    assert [parse_ack_subject(m.reply).stream_seq for m in msgs] == [1, 2]
    await queue.ack(msgs[0].reply)
    stats = await queue.stats(job_id)
    assert (stats.messages, stats.pending, stats.ack_pending, stats.deliveries, stats.redeliveries) == (3, 1, 1, 2, 0)
    started = time.monotonic()
    assert len(await queue.fetch(job_id, 5)) == 1
    assert await queue.fetch(job_id, 5) == []
    assert time.monotonic() - started < 1.5  # an empty fetch costs its 0.5 s timeout, no more


async def test_concurrent_fetches_share_nothing(queue: JobStreams) -> None:
    job_id, _ = await new_job(queue, 5)
    batches = await asyncio.gather(*(queue.fetch(job_id, 3) for _ in range(3)))
    seqs = [parse_ack_subject(m.reply).stream_seq for batch in batches for m in batch]
    assert sorted(seqs) == [1, 2, 3, 4, 5]  # each task handed to exactly one request
    assert all(len(batch) <= 3 for batch in batches)
    assert (await queue.stats(job_id)).ack_pending == 5  # none reserved without being handed out


async def test_redelivery_after_ack_wait_is_counted_cumulatively(queue: JobStreams) -> None:
    job_id, _ = await new_job(queue, 1)
    [first] = await queue.fetch(job_id, 1)
    await asyncio.sleep(1.2)
    [second] = await queue.fetch(job_id, 1)
    assert parse_ack_subject(second.reply).num_delivered == 2
    assert parse_ack_subject(second.reply).stream_seq == parse_ack_subject(first.reply).stream_seq
    await queue.ack(second.reply)
    stats = await queue.stats(job_id)
    assert (stats.redelivered, stats.redeliveries, stats.ack_pending) == (0, 1, 0)  # num_redelivered forgets, we don't


async def test_dead_letter_advisory_names_the_stream_seq(queue: JobStreams) -> None:
    job_id, _ = await new_job(queue, 2)
    [msg] = await queue.fetch(job_id, 1)
    seq = parse_ack_subject(msg.reply).stream_seq
    await asyncio.sleep(1.2)
    [again] = await queue.fetch(job_id, 1)
    assert parse_ack_subject(again.reply).stream_seq == seq
    assert await queue.dead_letters(job_id) == []  # not yet exhausted
    await asyncio.sleep(1.2)
    other = await queue.fetch(job_id, 5)  # the pull that finds it exhausted raises the advisory
    assert [parse_ack_subject(m.reply).stream_seq for m in other] == [2]
    letters: list[int] = []
    for _ in range(40):  # the server stores the advisory asynchronously
        letters = await queue.dead_letters(job_id)
        if letters:
            break
        await asyncio.sleep(0.05)
    assert letters == [seq]
    assert await queue.dead_letters(job_id) == []  # read advisories are acked


async def test_deleted_job_is_stream_gone_everywhere(queue: JobStreams) -> None:
    job_id, _ = await new_job(queue, 2)
    assert len(await queue.reserve(job_id, 1)) == 1
    await queue.delete_job(job_id)
    await queue.delete_job(job_id)  # twice is fine
    assert not await queue.exists(job_id)
    with pytest.raises(StreamGone):
        await queue.fetch(job_id, 1)
    with pytest.raises(StreamGone):
        await queue.stats(job_id)
    with pytest.raises(StreamGone):
        await queue.reserve(job_id, 1)
    assert job_id not in await queue.job_streams()


async def test_worker_reserve_takes_only_what_is_there_now(queue: JobStreams) -> None:
    job_id, _ = await new_job(queue, 3)
    started = time.monotonic()
    got = await queue.reserve(job_id, 5)
    assert [r.image_id for r in got] == ["0", "1", "2"] and all(r.num_delivered == 1 for r in got)
    assert await queue.reserve(job_id, 5) == []
    assert time.monotonic() - started < 0.3  # no_wait: no fetch timeout to sit out
    assert (await queue.stats(job_id)).ack_pending == 3
