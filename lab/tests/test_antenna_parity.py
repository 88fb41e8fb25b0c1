"""The local API behaves as the real Antenna on every point a worker can observe (docs/antenna-parity.md).

Real nats-server, real HTTP. The heart of it (issue 8): ``/result`` only
queues a background save; the ``+ACK`` follows the save, so a save that fails
(an injected fault, an algorithm the pipeline never registered) leaves the
message unacked and NATS redelivers it after ack_wait.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from antenna_flows.antenna_client import AntennaClient
from antenna_flows.jetstream import parse_ack_subject, stream_name
from antenna_lab.antenna.streams import JobStreams
from antenna_flows.schemas import PipelineResultsResponse, TaskResult

from lab.tests.test_api_contract import PIPELINE, error, post_results, reserve, success

FAST = dict(ack_wait_s=1.0, max_deliver=3)
AMI_KEYS = ("fasterrcnn_for_ami_moth_traps_2023", "moth_nonmoth_classifier")


def ami_success(task: dict[str, Any]) -> dict[str, Any]:
    """A result naming the ami pipeline's algorithms (registered by a stack with the ami kind)."""
    body = success(task)
    body["detections"][0]["algorithm"] = {"name": "FasterRCNN for AMI Moth Traps 2023", "key": AMI_KEYS[0]}
    body["detections"][0]["classifications"][0]["algorithm"] = {"name": "Moth / Non-Moth Classifier", "key": AMI_KEYS[1]}
    return body


async def ack_pending(queue: JobStreams, job_id: int) -> int:
    return (await queue.stats(job_id)).ack_pending


async def redelivered(api: httpx.Client, job_id: int, image_id: str, after_s: float) -> dict[str, Any]:
    await asyncio.sleep(after_s)
    [again] = reserve(api, job_id)
    assert again["image_id"] == image_id
    assert parse_ack_subject(again["reply_subject"]).num_delivered == 2
    return again


# --- save, then ack -------------------------------------------------------------------------------------


async def test_a_failed_save_is_not_acked_and_the_redelivery_is_saved(stack_factory, nats_queue: JobStreams) -> None:
    stack = stack_factory(**FAST)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 1)
    [task] = reserve(api, job.id)
    stack.fail_saves(30, fraction=1.0)
    response = post_results(api, job.id, (task["reply_subject"], success(task)))
    assert response.status_code == 200 and response.json()["tasks"][0]["status"] == "queued"  # accepted all the same
    stack.wait_saved()
    assert stack.store.results(job.id) == [] and await ack_pending(nats_queue, job.id) == 1

    stack.fail_saves(0)  # the database is back
    again = await redelivered(api, job.id, task["image_id"], FAST["ack_wait_s"] + 0.3)
    assert post_results(api, job.id, (again["reply_subject"], success(again))).status_code == 200
    final = stack.admin.wait_final(job.id, timeout=5)  # final figures, whether or not the stream is deleted yet
    assert (final.status, final.results, final.duplicates, final.redeliveries) == ("SUCCESS", 1, 0, 1), final
    [stored] = stack.store.results(job.id)
    assert stored.num_delivered == 2


async def test_save_faults_hit_the_seeded_fraction(stack_factory) -> None:
    stack = stack_factory(**FAST, seed=7)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 40)
    tasks = reserve(api, job.id, 40)
    stack.fail_saves(30, fraction=0.5)
    assert post_results(api, job.id, *[(t["reply_subject"], success(t)) for t in tasks]).status_code == 200
    stack.wait_saved()
    saved = len(stack.store.results(job.id))
    assert 8 <= saved <= 32  # about half failed (seeded, so the same every run)
    assert stack.antenna.plane.saves_failed == 40 - saved


async def test_slow_saves_delay_the_ack(stack_factory, nats_queue: JobStreams) -> None:
    stack = stack_factory(ack_wait_s=5.0)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 2)
    [task] = reserve(api, job.id)
    stack.slow_saves(30, delay_s=1.0)
    started = time.monotonic()
    assert post_results(api, job.id, (task["reply_subject"], success(task))).status_code == 200
    assert time.monotonic() - started < 0.8  # the answer does not wait for the save
    await asyncio.sleep(0.3)
    assert stack.store.results(job.id) == [] and await ack_pending(nats_queue, job.id) == 1
    stack.wait_saved()
    assert time.monotonic() - started >= 1.0
    await asyncio.sleep(0.1)
    assert len(stack.store.results(job.id)) == 1 and await ack_pending(nats_queue, job.id) == 0


async def test_unregistered_algorithm_is_refused_at_save_time_and_redelivered(stack_factory, nats_queue: JobStreams) -> None:
    """A stack with only the ami algorithms registered refuses sim results (PipelineNotConfigured), never acks them."""
    stack = stack_factory(**FAST, register_kinds=("ami",))
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 1)
    [task] = reserve(api, job.id)
    assert post_results(api, job.id, (task["reply_subject"], success(task))).status_code == 200  # sim keys
    stack.wait_saved()
    assert stack.store.results(job.id) == [] and await ack_pending(nats_queue, job.id) == 1

    again = await redelivered(api, job.id, task["image_id"], FAST["ack_wait_s"] + 0.3)
    assert post_results(api, job.id, (again["reply_subject"], ami_success(again))).status_code == 200
    final = stack.admin.wait_final(job.id, timeout=5)
    assert (final.status, final.results) == ("SUCCESS", 1)


async def test_error_results_need_no_registered_algorithm(stack_factory) -> None:
    stack = stack_factory(register_kinds=())
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 1)
    [task] = reserve(api, job.id)
    assert post_results(api, job.id, (task["reply_subject"], error(task))).status_code == 200
    assert stack.admin.wait_final(job.id, timeout=5).status == "FAILURE"  # 1 of 1 failed: more than half


# --- attribution and message bodies ----------------------------------------------------------------------


async def test_any_reply_subject_is_accepted_and_the_result_attributed_by_image_id(
    stack_factory, nats_queue: JobStreams
) -> None:
    stack = stack_factory(ack_wait_s=5.0)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 3)
    first, second, third = reserve(api, job.id, 3)
    response = post_results(
        api, job.id, ("inbox.not-an-ack-subject", success(first)), (third["reply_subject"], error(second))
    )
    assert response.status_code == 200
    assert [t["reply_subject"] for t in response.json()["tasks"]] == ["inbox.not-an-ack-subject", third["reply_subject"]]
    stack.wait_saved()
    stored = {r.image_id: r.kind for r in stack.store.results(job.id)}
    assert stored == {first["image_id"]: "ok", second["image_id"]: "error"}  # by image id, not by subject
    # the +ACK went where the result said: the third task's message, not the first's
    assert await ack_pending(nats_queue, job.id) == 2


async def test_task_bodies_in_the_stream_carry_reply_subject_null(stack: Any, nats_queue: JobStreams) -> None:
    job = stack.create_job(PIPELINE, 2)
    raw = await nats_queue.js.get_msg(stream_name(job.id), 1)
    body = json.loads(raw.data)
    assert body == {"id": body["image_id"], "image_id": body["image_id"], "image_url": body["image_url"], "reply_subject": None}


def test_bbox_may_be_null(stack: Any, api: httpx.Client) -> None:
    job = stack.create_job(PIPELINE, 1)
    [task] = reserve(api, job.id)
    body = success(task)
    body["detections"][0]["bbox"] = None
    assert post_results(api, job.id, (task["reply_subject"], body)).status_code == 200
    assert stack.admin.wait_final(job.id, timeout=5).results == 1


# --- status codes, states, listing ----------------------------------------------------------------------------


def test_status_code_ordering(stack: Any, api: httpx.Client) -> None:
    # /tasks validates the body before looking the job up (400 before 404); /result looks the job up first
    assert api.post("jobs/999/tasks/", json={"batch_size": 0}).status_code == 400
    assert api.post("jobs/999/tasks/", json={"batch_size": 1}).status_code == 404
    assert api.post("jobs/999/result/", json={"results": "bad"}).status_code == 404
    job = stack.create_job(PIPELINE, 1, dispatch_mode="sync_api")
    response = api.post(f"jobs/{job.id}/tasks/", json={"batch_size": 1})
    assert (response.status_code, response.json()) == (400, ["Only async_api jobs have fetchable tasks"])
    assert api.post(f"jobs/{job.id}/result/", json={"results": "bad"}).status_code == 400


def test_more_than_half_failed_is_failure(stack: Any, api: httpx.Client) -> None:
    job = stack.create_job(PIPELINE, 3)
    a, b, c = reserve(api, job.id, 3)
    post_results(api, job.id, (a["reply_subject"], error(a)), (b["reply_subject"], error(b)), (c["reply_subject"], success(c)))
    final = stack.admin.wait_final(job.id, timeout=5)
    assert (final.status, final.results, final.errors) == ("FAILURE", 1, 2)


def test_job_list_is_served_anonymously(stack: Any) -> None:
    stack.create_job(PIPELINE, 1)
    assert httpx.get(f"{stack.api_url}/jobs/", params={"ids_only": 1}).json()["count"] == 1
    assert httpx.get(f"{stack.api_url}/jobs/", headers={"Authorization": "Token wrong"}).status_code == 401


def test_cancel_goes_through_canceling_while_nats_is_down(stack_factory) -> None:
    stack = stack_factory(own_nats=True)
    job = stack.create_job(PIPELINE, 2)
    assert job.status == "STARTED"
    stack.stop_nats()
    deadline = time.monotonic() + 5
    while stack.antenna.plane.nats_connected:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert stack.admin.cancel(job.id).status == "CANCELING"  # streams not deleted yet
    stack.start_nats()
    deadline = time.monotonic() + 5
    while stack.admin.job(job.id).status != "REVOKED":  # housekeeping deletes them, then REVOKED
        assert time.monotonic() < deadline
        time.sleep(0.05)


async def test_dead_letters_are_left_alone_without_the_reaper(stack_factory) -> None:
    stack = stack_factory(ack_wait_s=0.5, max_deliver=1)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 1)
    reserve(api, job.id)
    await asyncio.sleep(0.7)
    assert reserve(api, job.id) == []  # exhausted: NATS will not deliver it again
    await asyncio.sleep(0.6)  # a few housekeeping rounds
    current = stack.admin.job(job.id)
    assert (current.status, current.errors, current.dead_lettered) == ("STARTED", 0, 0)


# --- faults and counts the bench reads -------------------------------------------------------------------


async def test_request_counts_are_the_workers_not_the_admins(stack: Any) -> None:
    stack.admin.jobs()
    job = stack.create_job(PIPELINE, 1)
    stack.admin.job(job.id)
    assert stack.request_counts() == {"jobs": 0, "tasks": 0, "result": 0, "other": 0}
    async with AntennaClient(stack.api_url, stack.token) as worker:
        assert [j.id for j in await worker.list_jobs([PIPELINE])] == [job.id]
        [task] = await worker.reserve_tasks(job.id, 1)
        result = PipelineResultsResponse.model_validate(success(task.model_dump()))
        await worker.post_results(job.id, [TaskResult(reply_subject=task.reply_subject or "", result=result)])
        await worker.http.get(f"/jobs/{job.id}/")
    assert stack.request_counts() == {"jobs": 1, "tasks": 1, "result": 1, "other": 1}


def test_slow_api_delays_every_answer(stack: Any, api: httpx.Client) -> None:
    stack.slow_api(5, delay_s=0.3)
    started = time.monotonic()
    assert api.get("jobs/").status_code == 200
    assert time.monotonic() - started >= 0.3
    stack.slow_api(0, 0)
    started = time.monotonic()
    api.get("jobs/")
    assert time.monotonic() - started < 0.3


async def test_results_for_no_image_of_the_job(stack_factory, nats_queue: JobStreams) -> None:
    """A success naming no image of the job fails its save (not acked); an error result for none is acked, not stored."""
    stack = stack_factory(ack_wait_s=5.0)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 3)
    first, second, _ = reserve(api, job.id, 3)
    stranger = {**first, "image_id": "no-such-image"}
    post_results(api, job.id, (first["reply_subject"], success(stranger)), (second["reply_subject"], error(stranger)))
    stack.wait_saved()
    assert stack.store.results(job.id) == []
    assert await ack_pending(nats_queue, job.id) == 2  # the first still held; the second acked
