"""The fair worker end to end: real nats-server, the local API over HTTP, the sim model.

Plain orchestration here (the same worker code runs under Prefect in
test_worker_prefect.py). Every test ends by checking the API's records: each
image answered exactly as intended, nothing lost.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from antenna_lab.antenna.admin import AntennaError, AsyncAntennaAdmin
from antenna_lab.antenna.streams import JobStreams
from antenna_flows.jetstream import stream_name, subject_name
from antenna_flows.worker import FatalWorkerError
from tests.helpers import PIPELINE, all_answered, serve_until, settings_for, worker_for

async def test_interleaves_jobs_and_answers_every_image_once(stack, aadmin):
    big = stack.create_job(PIPELINE, 60, job_id=101)
    small = stack.create_job(PIPELINE, 6, job_id=102)
    worker = worker_for(settings_for(stack))
    await serve_until([worker], all_answered(aadmin, big.id, small.id))
    big, small = await aadmin.job(big.id), await aadmin.job(small.id)
    assert (big.results, big.errors, big.duplicates) == (60, 0, 0)
    assert (small.results, small.errors, small.duplicates) == (6, 0, 0)
    assert big.redeliveries == 0 and small.redeliveries == 0
    # interleaved: the small job finished long before the big one
    assert small.completed_at < big.completed_at - 0.1
    rows = {r["job_id"]: r for r in worker.ledger.rows()}
    assert rows[101]["images"] == 60 and rows[102]["images"] == 6
    # cross-job batches: at least one batch held both jobs
    assert rows[101]["batches"] + rows[102]["batches"] > worker.ledger.batches


async def test_small_job_submitted_behind_big_one_finishes_fast(stack, aadmin):
    big = stack.create_job(PIPELINE, 400, job_id=111)
    worker = worker_for(settings_for(stack, sim_seconds_per_image=0.01))
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(1.0)
        submitted = time.time()
        small = stack.create_job(PIPELINE, 4, job_id=112)
        job = await aadmin.wait_final(small.id, timeout=20)
        assert job.status == "SUCCESS"
        assert job.completed_at - submitted < 2.0, job.completed_at - submitted
        assert (await aadmin.job(big.id)).status == "STARTED"  # the big one is still going
    finally:
        worker.stop()
        await run


async def test_priority_job_goes_first(stack, aadmin):
    stack.create_job(PIPELINE, 200, job_id=121)
    worker = worker_for(settings_for(stack, sim_seconds_per_image=0.02))
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.8)
        submitted = time.time()
        urgent = stack.create_job(PIPELINE, 1, job_id=122, priority=10)
        job = await aadmin.wait_final(urgent.id, timeout=10)
        assert job.completed_at - submitted < 1.0
    finally:
        worker.stop()
        await run


async def test_bad_images_get_error_results_and_the_job_completes(stack, aadmin):
    job = stack.create_job(PIPELINE, 12, job_id=131, missing=2, corrupt=3)
    worker = worker_for(settings_for(stack))
    await serve_until([worker], all_answered(aadmin, job.id))
    job = await aadmin.job(job.id)
    assert (job.results, job.errors, job.status) == (7, 5, "SUCCESS")
    errors = [r for r in stack.store.results(job.id) if r.kind == "error"]
    messages = " ".join(json.dumps(r.payload) for r in errors)
    assert "HTTP 404" in messages  # missing
    assert "corrupt" in messages or "not a readable image" in messages


async def test_poison_task_is_terminated_and_the_rest_of_its_batch_answered(stack, aadmin, nats_queue: JobStreams):
    job = stack.create_job(PIPELINE, 3, job_id=141)
    # A message no PipelineProcessingTask parses, at a sequence Antenna has no image for.
    await nats_queue.js.publish(subject_name(job.id), b'{"id": 5, "oops": true}', stream=stream_name(job.id))
    worker = worker_for(settings_for(stack))

    async def settled() -> bool:
        return worker.ledger.job(job.id).terminated == 1 and (await aadmin.job(job.id)).status == "SUCCESS"

    await serve_until([worker], settled)
    job = await aadmin.job(job.id)
    assert (job.results, job.errors, job.duplicates) == (3, 0, 0)
    assert worker.ledger.job(job.id).released == 0


async def test_reservations_outlive_ack_wait_with_in_progress(stack_factory, aadmin_factory=None):
    """A batch slower than ack_wait: +WPI keeps every held task, so nothing is redelivered."""
    stack = stack_factory(ack_wait_s=1.0, max_deliver=2)
    job = stack.create_job(PIPELINE, 8, job_id=151)
    # 4 images x 0.3 s = 1.2 s per batch > ack_wait; the second batch waits reserved meanwhile.
    worker = worker_for(settings_for(stack, sim_seconds_per_image=0.3, reserve_fraction=1.0, max_batch_size=4))
    async with AsyncAntennaAdmin(stack.api_url, stack.token) as aadmin:
        await serve_until([worker], all_answered(aadmin, job.id), timeout=30)
        job = await aadmin.job(job.id)
    assert (job.results, job.duplicates, job.redeliveries) == (8, 0, 0)


async def test_graceful_stop_releases_reserved_tasks_for_others(stack, aadmin):
    job = stack.create_job(PIPELINE, 40, job_id=161)
    first = worker_for(settings_for(stack, worker_name="first", sim_seconds_per_image=0.05, prefetch_batches=2))
    run = asyncio.create_task(first.run())
    while first.ledger.batches < 1 or not first.store.waiting_counts():  # a batch run, more reserved
        await asyncio.sleep(0.01)
    first.stop("test")
    await run
    released = first.ledger.job(job.id).released
    assert released > 0
    second = worker_for(settings_for(stack, worker_name="second"))
    await serve_until([second], all_answered(aadmin, job.id))
    job = await aadmin.job(job.id)
    assert (job.results, job.duplicates) == (40, 0)
    assert job.results == first.ledger.job(job.id).images + second.ledger.job(job.id).images


async def test_api_outage_is_ridden_out_with_retries(stack, aadmin):
    job = stack.create_job(PIPELINE, 40, job_id=171)
    worker = worker_for(settings_for(stack, sim_seconds_per_image=0.02, post_retries=8, post_retry_delay_s=0.1))
    outage = {"done": False}

    async def done() -> bool:
        if not outage["done"] and worker.ledger.job(job.id).images >= 4:
            stack.fail_api(1.5)  # mid-job: posts fail, are retried with backoff, tasks kept alive meanwhile
            outage["done"] = True
        return outage["done"] and await all_answered(aadmin, job.id)()

    await serve_until([worker], done, timeout=30)
    job = await aadmin.job(job.id)
    assert (job.results, job.duplicates, job.redeliveries) == (40, 0, 0)
    assert worker.ledger.job(job.id).released == 0


async def test_cancelled_job_is_dropped_without_stopping_the_worker(stack, aadmin):
    doomed = stack.create_job(PIPELINE, 200, job_id=181)
    other = stack.create_job(PIPELINE, 20, job_id=182)
    worker = worker_for(settings_for(stack, sim_seconds_per_image=0.02))
    run = asyncio.create_task(worker.run())
    try:
        while worker.ledger.job(doomed.id).images < 4:
            await asyncio.sleep(0.05)
        await aadmin.cancel(doomed.id)
        job = await aadmin.wait_final(other.id, timeout=20)
        assert job.status == "SUCCESS"
        await asyncio.sleep(0.5)
        assert doomed.id not in worker.rotation
    finally:
        worker.stop()
        await run


async def test_wrong_token_stops_the_worker_with_a_clear_error(stack):
    worker = worker_for(settings_for(stack, antenna_api_token="not-the-token"))
    with pytest.raises(FatalWorkerError, match="token"):
        await asyncio.wait_for(worker.run(), timeout=10)


async def test_unserved_pipeline_is_left_in_the_queue(stack, aadmin, nats_queue: JobStreams):
    job = stack.create_job("uk_denmark_moths_2023", 5, job_id=191)
    worker = worker_for(settings_for(stack, pipelines=[PIPELINE]))
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(1.0)
    worker.stop()
    await run
    stats = await nats_queue.stats(job.id)
    assert (stats.pending, stats.ack_pending, stats.deliveries) == (5, 0, 0)


async def test_metrics_lines_record_batches(stack, aadmin, tmp_path: Path):
    job = stack.create_job(PIPELINE, 10, job_id=195)
    metrics = tmp_path / "m.jsonl"
    worker = worker_for(settings_for(stack, metrics_file=metrics))
    await serve_until([worker], all_answered(aadmin, job.id))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sum(r["n"] for r in rows) == 10
    assert all(r["slot_s"] > 0 and r["max_reserved_idle_s"] >= 0 for r in rows)


async def test_rest_transport_serves_jobs_through_the_api_alone(stack, aadmin):
    """No NATS for the worker: tasks reserved with POST /tasks/, acked by Antenna when it saves."""
    job = stack.create_job(PIPELINE, 10, job_id=198)
    worker = worker_for(settings_for(stack, transport="rest", nats_url="nats://127.0.0.1:1", rest_ack_wait_s=2.0))
    await serve_until([worker], all_answered(aadmin, job.id))
    job = await aadmin.job(job.id)
    assert (job.results, job.duplicates, job.redeliveries) == (10, 0, 0)


async def test_rollover_at_max_runtime_hands_over_with_nothing_released(stack, aadmin):
    """At max_runtime_s the run reserves nothing more, runs what it holds, stops; the next run takes over."""
    job = stack.create_job(PIPELINE, 120, job_id=171)
    first = worker_for(settings_for(stack, max_runtime_s=1.0, sim_seconds_per_image=0.02))
    totals = await asyncio.wait_for(first.run(), timeout=20)  # ends by itself
    assert "max_runtime_s" in first.stop_reason
    assert first.ledger.job(job.id).released == 0  # nothing handed back: nothing to be redelivered
    assert 0 < totals["images"] < 120
    second = worker_for(settings_for(stack, worker_name="test-worker-next"))
    await serve_until([second], all_answered(aadmin, job.id))
    job = await aadmin.job(job.id)
    assert (job.results, job.duplicates, job.redeliveries) == (120, 0, 0)


async def test_a_wrong_token_mid_job_hands_everything_back_and_loses_nothing(stack, aadmin):
    """A wrong token is refused at the worker's first request (401, even on the job list that Antenna
    serves anonymously): it stops with a clear error, holding nothing, and the job is served by others."""
    job = stack.create_job(PIPELINE, 16, job_id=181)
    bad = worker_for(settings_for(stack, antenna_api_token="not-the-token", worker_name="bad-token"))
    with pytest.raises(FatalWorkerError, match="token"):
        await asyncio.wait_for(bad.run(), timeout=15)
    assert bad.ledger.job(job.id).images == 0
    good = worker_for(settings_for(stack))
    await serve_until([good], all_answered(aadmin, job.id))
    job = await aadmin.job(job.id)
    assert (job.results, job.duplicates) == (16, 0)


async def test_a_nats_url_nothing_answers_at_stops_the_worker_naming_nats(stack, monkeypatch):
    from antenna_flows import transport
    from antenna_flows.unreachable import ServiceUnreachable

    monkeypatch.setattr(transport, "FIRST_CONNECT_S", 1.0)
    worker = worker_for(settings_for(stack, nats_url="nats://127.0.0.1:9"))
    with pytest.raises(ServiceUnreachable) as failed:
        await asyncio.wait_for(worker.run(), 10)
    assert failed.value.service == "NATS" and "nats://127.0.0.1:9" in str(failed.value)
