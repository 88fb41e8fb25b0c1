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

from lab.tests.test_api_contract import PIPELINE, REAL_PIPELINE, error, post_results, reserve, success

FAST = dict(ack_wait_s=1.0, max_deliver=3)
AMI_KEYS = ("fasterrcnn_for_ami_moth_traps_2023", "moth_nonmoth_classifier")


def ami_success(task: dict[str, Any]) -> dict[str, Any]:
    """A result naming the ami pipeline's algorithms (registered by a stack with the ami kind) on the real pipeline."""
    body = success(task, pipeline=REAL_PIPELINE)
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
    job = stack.create_job(REAL_PIPELINE, 1)
    [task] = reserve(api, job.id)
    sim_keys = success(task, pipeline=REAL_PIPELINE)
    assert post_results(api, job.id, (task["reply_subject"], sim_keys)).status_code == 200
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


# --- what Antenna refuses (issue 18) --------------------------------------------------------------------------


def _pipeline(slug: str, *algorithms: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"Pipeline {slug}", "slug": slug, "version": 1, "algorithms": list(algorithms)}


SIM_DETECTOR = {"name": "Sim detector", "key": "sim-detector", "task_type": "localization"}
ONE_LABEL = {"data": [{"index": 0, "label": "Moth"}], "labels": ["Moth"]}


def test_a_classifier_without_category_map_is_refused_at_registration(stack: Any, api: httpx.Client) -> None:
    """Antenna's ``get_or_create_algorithm_and_category_map``: 500 ``PipelineNotConfigured``, nothing stored
    (one transaction: not even the request's other pipeline)."""
    unmapped = {"name": "Cls", "key": "parity-cls", "task_type": "classification"}
    body = {"processing_service_name": "svc (host)", "pipelines": [
        _pipeline("parity_fine", SIM_DETECTOR), _pipeline("parity_unmapped", SIM_DETECTOR, unmapped)]}
    refused = api.post("projects/1/pipelines/", json=body)
    assert refused.status_code == 500 and refused.headers["content-type"].startswith("text/html")
    assert "PipelineNotConfigured" in refused.text
    assert "No valid category map found for algorithm &#x27;parity-cls&#x27; with task type &#x27;classification&#x27;" in refused.text
    assert stack.store.pipeline_config(1, "parity_fine") is None and stack.store.algorithm_keys(1, "parity_unmapped") == set()

    tagging = {"name": "Tags", "key": "parity-tags", "task_type": "tagging"}  # a classification type too
    assert api.post("projects/1/pipelines/", json={**body, "pipelines": [_pipeline("p", tagging)]}).status_code == 500
    # a detector needs no map; a classifier with one is registered, and from then on may be re-registered without
    detector_only = {**body, "pipelines": [_pipeline("parity_fine", {**SIM_DETECTOR, "category_map": None})]}
    assert api.post("projects/1/pipelines/", json=detector_only).status_code == 201
    mapped = {**body, "pipelines": [_pipeline("parity_unmapped", SIM_DETECTOR, {**unmapped, "category_map": ONE_LABEL})]}
    assert api.post("projects/1/pipelines/", json=mapped).status_code == 201
    assert api.post("projects/1/pipelines/", json=body).status_code == 201
    assert stack.store.algorithm_keys(1, "parity_unmapped") == {"sim-detector", "parity-cls"}


async def test_a_pipeline_with_two_detection_algorithms_refuses_every_save(stack_factory, nats_queue: JobStreams) -> None:
    """Antenna's ``save_results``: ``NotImplementedError("Multiple detection algorithms per pipeline are not
    supported")``: the save fails, the task is not acked, NATS redelivers it. What a sim fleet declaring its
    algorithms on a real pipeline would do to that pipeline."""
    stack = stack_factory(**FAST, register_kinds=())
    api = stack.admin.client
    sim_classifier = {"name": "Sim classifier", "key": "sim-classifier", "task_type": "classification",
                      "category_map": ONE_LABEL}
    slug = "parity_two_detectors"
    first = {"processing_service_name": "sim (host)", "pipelines": [_pipeline(slug, SIM_DETECTOR, sim_classifier)]}
    assert api.post("projects/1/pipelines/", json=first).status_code == 201
    job = stack.create_job(slug, 2)
    a, b = reserve(api, job.id, 2)
    assert post_results(api, job.id, (a["reply_subject"], success(a, pipeline=slug))).status_code == 200
    stack.wait_saved()
    assert [r.image_id for r in stack.store.results(job.id)] == [a["image_id"]]  # one detector: saved

    real_detector = {"name": "Real detector", "key": "parity-real-detector", "task_type": "detection"}
    second = {"processing_service_name": "ami (host)", "pipelines": [_pipeline(slug, real_detector)]}
    assert api.post("projects/1/pipelines/", json=second).status_code == 201  # registration itself is fine
    assert post_results(api, job.id, (b["reply_subject"], success(b, pipeline=slug))).status_code == 200
    stack.wait_saved()
    assert len(stack.store.results(job.id)) == 1 and await ack_pending(nats_queue, job.id) == 1  # refused, not acked
    again = await redelivered(api, job.id, b["image_id"], FAST["ack_wait_s"] + 0.3)
    assert post_results(api, job.id, (again["reply_subject"], success(again, pipeline=slug))).status_code == 200
    stack.wait_saved()
    assert len(stack.store.results(job.id)) == 1 and stack.antenna.plane.saves_failed == 2  # every save refused


async def test_a_pipeline_without_a_detection_algorithm_refuses_saves(stack_factory) -> None:
    """``ValueError("Pipeline does not have a detection algorithm")``: a pipeline nobody registered a detector for."""
    stack = stack_factory(register_kinds=())
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 1)
    [task] = reserve(api, job.id)
    assert post_results(api, job.id, (task["reply_subject"], success(task))).status_code == 200
    stack.wait_saved()
    assert stack.store.results(job.id) == [] and stack.antenna.plane.saves_failed == 1


# --- liveness: the polls Antenna counts mark processing services seen -------------------------------------------


def _service(api: httpx.Client, name: str) -> dict[str, Any]:
    listing = api.get("ml/processing_services/", params={"project_id": 1}).json()
    [row] = [s for s in listing["results"] if s["name"] == name]
    assert set(row) >= {"id", "details", "name", "projects", "endpoint_url", "is_async", "pipelines", "last_seen",
                        "last_seen_live"}
    return row


async def test_polls_mark_the_services_of_their_pipelines_seen_throttled(nats_server, tmp_path) -> None:
    """Registration marks a service seen; then, as Antenna, ``GET /jobs/?ids_only=1&pipeline__slug__in=``,
    ``/tasks`` and ``/result`` mark the services of those pipelines seen, at most once per throttle window
    (30 s in Antenna, 0.4 s here); a service not seen within the online window (60 s, 1 s here) is not live."""
    from antenna_lab.antenna.devstack import DevStack
    from antenna_lab.settings import ApiSettings, QueueSettings

    stack = DevStack(QueueSettings(nats_task_ttr=5.0), ApiSettings(api_port=0, data_dir=tmp_path), nats_url=nats_server.url,
                     register_kinds=("sim",), heartbeat_throttle_s=0.4, online_window_s=1.0, housekeeping_interval_s=0.2)
    with stack, httpx.Client(base_url=stack.api_url + "/", headers={"Authorization": f"Token {stack.token}"}) as api:
        sim_classifier = {"name": "Sim classifier", "key": "sim-classifier", "task_type": "classification",
                          "category_map": ONE_LABEL}
        body = {"processing_service_name": "worker (gpu-1)", "pipelines": [_pipeline(PIPELINE, SIM_DETECTOR, sim_classifier)]}
        assert api.post("projects/1/pipelines/", json=body).status_code == 201
        registered = _service(api, "worker (gpu-1)")
        assert registered["last_seen_live"] is True and registered["is_async"] and registered["endpoint_url"] is None
        assert [p["slug"] for p in registered["pipelines"]] == [PIPELINE] and registered["projects"] == [1]
        await asyncio.sleep(1.1)
        assert _service(api, "worker (gpu-1)")["last_seen_live"] is False  # silent past the online window

        async with AntennaClient(stack.api_url, stack.token) as worker:
            await worker.list_jobs(["moth_binary"])  # a poll for other pipelines says nothing of this service
            assert _service(api, "worker (gpu-1)")["last_seen_live"] is False
            await worker.list_jobs([PIPELINE, "moth_binary"])
            polled = _service(api, "worker (gpu-1)")
            assert polled["last_seen_live"] is True and polled["last_seen"] > registered["last_seen"]
            await worker.list_jobs([PIPELINE, "moth_binary"])  # within the throttle window: not written again
            assert _service(api, "worker (gpu-1)")["last_seen"] == polled["last_seen"]

        api.get("jobs/", params={"pipeline__slug__in": PIPELINE})  # a plain listing is no worker's poll
        assert _service(api, "worker (gpu-1)")["last_seen"] == polled["last_seen"]
        job = stack.create_job(PIPELINE, 1)
        await asyncio.sleep(0.5)
        [task] = reserve(api, job.id)  # /tasks: the job's (pipeline, project)
        tasked = _service(api, "worker (gpu-1)")["last_seen"]
        assert tasked > polled["last_seen"]
        await asyncio.sleep(0.5)
        assert post_results(api, job.id, (task["reply_subject"], success(task))).status_code == 200  # /result
        assert _service(api, "worker (gpu-1)")["last_seen"] > tasked
        one = api.get(f"ml/processing_services/{registered['id']}/").json()
        assert one["name"] == "worker (gpu-1)" and one["last_seen_live"] is True


async def test_the_full_job_list_carries_antennas_progress_stages(stack: Any, api: httpx.Client) -> None:
    """Antenna's job rows nest the pipeline and carry ``progress.stages``: ``collect`` (``total_images``) and
    ``results`` (the fraction saved). A worker pacing over REST reads its saved counts there."""
    job = stack.create_job(PIPELINE, 4)
    tasks = reserve(api, job.id, 3)
    assert post_results(api, job.id, *[(t["reply_subject"], success(t)) for t in tasks]).status_code == 200
    stack.wait_saved()
    row = api.get("jobs/", params={"incomplete_only": 1, "pipeline__slug__in": PIPELINE}).json()["results"][0]
    assert row["pipeline"]["slug"] == PIPELINE and row["project"]["id"] == 1
    stages = {s["key"]: s for s in row["progress"]["stages"]}
    assert stages["collect"]["params"][0] == {"name": "Total Images", "key": "total_images", "category": "default",
                                              "value": 4}
    assert stages["results"]["progress"] == 0.75 and stages["results"]["status"] == "STARTED"
    async with AntennaClient(stack.api_url, stack.token) as worker:
        [listed] = await worker.list_jobs([PIPELINE], progress=True)
    assert (listed.id, listed.total, listed.saved) == (job.id, 4, 3)
    assert api.get(f"jobs/{job.id}/").json()["progress"]["summary"] == {"status": "STARTED", "progress": 0.75}
