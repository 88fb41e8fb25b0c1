"""What the queue report reads (antenna_flows/queue_report/readers.py), against a real local Antenna and
nats-server: the incomplete jobs, their job objects, their NATS consumers; a source that cannot be
read leaves its part out and says which service at which URL."""

from __future__ import annotations

import socket

from antenna_flows.queue_report.readers import consumer_stats, incomplete_jobs, job_details

PIPELINE = "sim-panama_moths_2024"  # the sim model serves pipelines of its own


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_incomplete_jobs_details_and_consumers(stack, api):
    stack.create_job(PIPELINE, 6, job_id=701)
    stack.create_job(PIPELINE, 4, job_id=702)
    tasks = api.post("jobs/701/tasks/", json={"batch_size": 2}).json()["tasks"]  # two reserved, not answered
    assert len(tasks) == 2

    jobs = await incomplete_jobs(stack.api_url, stack.token)
    assert jobs == [(701, PIPELINE), (702, PIPELINE)]

    details = await job_details(stack.api_url, stack.token, [701, 702, 799])  # 799: no such job, left out
    assert set(details) == {701, 702}
    assert (details[701]["total"], details[701]["results"]) == (6, 0)

    stats, problem = await consumer_stats(stack.nats_url, [701, 702, 799])  # 799: no stream, left out
    assert problem is None and set(stats) == {701, 702}
    assert (stats[701].messages, stats[701].ack_pending, stats[701].pending) == (6, 2, 4)
    assert (stats[702].messages, stats[702].ack_pending, stats[702].pending) == (4, 0, 4)


async def test_an_unreachable_nats_leaves_its_columns_out_and_says_where():
    url = f"nats://127.0.0.1:{closed_port()}"
    stats, problem = await consumer_stats(url, [1, 2])
    assert stats == {}
    assert problem is not None and problem.startswith(f"cannot reach NATS at {url}"), problem


async def test_a_rest_only_fleet_has_no_nats_to_read_and_says_so():
    from antenna_flows.queue_report.readers import consumer_stats

    stats, problem = await consumer_stats(None, [1, 2])
    assert stats == {} and problem is not None and "AMI_NATS_URL" in problem
