"""The ack of an answered task is Antenna's, after its save (issue 8, worker side).

Against the local API in its Antenna-like mode (background saves, the +ACK only
after a save, algorithm keys checked against the registered pipeline), with a real
nats-server and the sim model. Each test ends on the API's records.
"""

from __future__ import annotations

import asyncio

from antenna_flows.jetstream import JobQueue
from antenna_lab.antenna.admin import AsyncAntennaAdmin
from tests.helpers import PIPELINE, all_answered, serve_until, settings_for, worker_for


async def test_a_failed_save_is_answered_again_saved_and_nothing_is_lost(stack_factory):
    stack = stack_factory(ack_wait_s=1.0, max_deliver=4)
    stack.fail_saves(seconds=1.5, fraction=1.0)  # every save in the first 1.5 s fails, as a database outage would
    job = stack.create_job(PIPELINE, 6, job_id=801)
    worker = worker_for(settings_for(stack))
    async with AsyncAntennaAdmin(stack.api_url, stack.token) as aadmin:
        await serve_until([worker], all_answered(aadmin, job.id), timeout=30)
        job = await aadmin.job(job.id)
    assert (job.results, job.errors, job.status) == (6, 0, "SUCCESS")
    assert stack.dead_lettered(job.id) == 0
    ledger = worker.ledger.job(job.id)
    assert ledger.reanswered >= 1  # the redeliveries Antenna counted on were answered, not swallowed
    assert ledger.recomputed == 0  # from the kept answers: no second inference
    assert ledger.released == 0


async def test_results_antenna_refuses_to_save_are_never_acked(stack_factory):
    # Only the ami algorithms are registered: Antenna accepts the sim worker's post (200) and then
    # refuses each save (unknown algorithm). The worker must not have acked: NATS redelivers.
    stack = stack_factory(ack_wait_s=0.5, max_deliver=2, register_kinds=("ami",))
    job = stack.create_job(PIPELINE, 2, job_id=802)
    worker = worker_for(settings_for(stack))
    queue = await JobQueue.connect(stack.nats_url, name="test-observer")
    try:
        async def redelivered() -> bool:
            return (await queue.stats(job.id)).redeliveries >= 2

        await serve_until([worker], redelivered, timeout=20)
        stats = await queue.stats(job.id)
    finally:
        await queue.close()
    async with AsyncAntennaAdmin(stack.api_url, stack.token) as aadmin:
        job = await aadmin.job(job.id)
    assert job.results == 0 and job.status == "STARTED"  # nothing saved, nothing pretended
    assert stats.redeliveries >= 2  # both tasks came back: never acked by the worker
    assert worker.ledger.job(job.id).reanswered >= 1  # and each redelivery was answered again


async def test_a_slow_save_within_ack_wait_causes_no_redelivery(stack_factory):
    stack = stack_factory(ack_wait_s=2.0, max_deliver=2)
    stack.slow_saves(seconds=30, delay_s=1.0)  # a backlogged Celery: saves, and so acks, 1 s late
    job = stack.create_job(PIPELINE, 8, job_id=803)
    worker = worker_for(settings_for(stack))
    async with AsyncAntennaAdmin(stack.api_url, stack.token) as aadmin:
        await serve_until([worker], all_answered(aadmin, job.id), timeout=30)
        await asyncio.sleep(0.2)
        job = await aadmin.job(job.id)
    assert (job.results, job.duplicates, job.redeliveries) == (8, 0, 0)
    assert worker.ledger.job(job.id).reanswered == 0


async def test_an_idle_worker_polls_gently_and_still_joins_a_new_job_at_once(stack_factory):
    """<= 0.25 requests per worker-second while idle; a new job joins within 1 s (JetStream advisory)."""
    stack = stack_factory(ack_wait_s=5.0, max_deliver=2)
    worker = worker_for(settings_for(stack, discovery_interval_s=4.0))  # the default poll interval
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(2.0)  # start-up: first poll done
        stack.reset_request_counts()
        await asyncio.sleep(8.0)
        idle = stack.request_counts()
        assert sum(idle.values()) <= 0.25 * 8.0, idle
        submitted = asyncio.get_running_loop().time()
        job = stack.create_job(PIPELINE, 1, job_id=804)
        async with AsyncAntennaAdmin(stack.api_url, stack.token) as aadmin:
            job = await aadmin.wait_final(job.id, timeout=10)
        assert job.status == "SUCCESS"
        assert asyncio.get_running_loop().time() - submitted < 1.5  # joined at once, not at the next poll
    finally:
        worker.stop()
        await run
