"""The local Antenna over real HTTP on a live nats-server: Antenna's contract, its bad inputs, our extensions.

No mocks: every test drives the API the way a worker does (httpx, token
header) and checks the JetStream consumer behind it. Waits are ack_wait
(1 s where a redelivery must happen) plus a margin.
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import httpx
import pytest
from nats.js.errors import NotFoundError
from PIL import Image

from antenna_flows.antenna_client import AntennaClient, Rejected
from antenna_lab.antenna.admin import AntennaError, AsyncAntennaAdmin
from antenna_lab.antenna.devstack import DevStack
from antenna_lab.antenna.streams import JobStreams
from antenna_lab.bench.bench import job_pipeline
from antenna_flows.jetstream import ADVISORY_STREAM, dlq_name, parse_ack_subject, stream_name

# The pipeline the tests' jobs run on: the one the sim model's results (``success``) belong to, as the
# devstack pre-registers it (``sim-panama_moths_2024`` once sim declares pipelines of its own).
REAL_PIPELINE = "panama_moths_2024"
PIPELINE = job_pipeline(REAL_PIPELINE, "sim")
FAST = dict(ack_wait_s=1.0, max_deliver=2)  # where a test must wait for a redelivery


# --- helpers -------------------------------------------------------------------------------


def tasks_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return response.json()["tasks"]


def reserve(api: httpx.Client, job_id: int, batch_size: int = 1) -> list[dict[str, Any]]:
    return tasks_of(api.post(f"jobs/{job_id}/tasks/", json={"batch_size": batch_size}))


def success(task: dict[str, Any], pipeline: str = PIPELINE) -> dict[str, Any]:
    """A schema-valid PipelineResultsResponse for one task (one detection, one classification), as the
    sim model answers (its algorithms, its pipeline)."""
    now = "2026-01-01T00:00:00Z"
    algorithm = {"name": "Sim detector", "key": "sim-detector"}
    return {
        "pipeline": pipeline,
        "algorithms": {},
        "total_time": 0.1,
        "source_images": [{"id": task["image_id"], "url": task["image_url"]}],
        "detections": [
            {
                "source_image_id": task["image_id"],
                "bbox": {"x1": 1, "y1": 2, "x2": 30, "y2": 40},
                "inference_time": 0.01,
                "algorithm": algorithm,
                "timestamp": now,
                "classifications": [
                    {
                        "classification": "Moth",
                        "labels": ["Moth", "Not moth"],
                        "scores": [0.9, 0.1],
                        "algorithm": {"name": "Sim classifier", "key": "sim-classifier"},
                        "timestamp": now,
                    }
                ],
            }
        ],
    }


def error(task: dict[str, Any] | None, message: str = "image download failed") -> dict[str, Any]:
    return {"error": message, "image_id": task["image_id"] if task else None}


def post_results(api: httpx.Client, job_id: int, *pairs: tuple[str, dict[str, Any]]) -> httpx.Response:
    return api.post(f"jobs/{job_id}/result/", json={"results": [{"reply_subject": r, "result": x} for r, x in pairs]})


def answer(api: httpx.Client, job_id: int, task: dict[str, Any], stack: DevStack | None = None) -> httpx.Response:
    """Post a success for ``task``; with ``stack``, wait until the API's background save of it is done."""
    response = post_results(api, job_id, (task["reply_subject"], success(task)))
    assert response.status_code == 200, response.text
    if stack is not None:
        stack.wait_saved()
    return response


def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


async def stream_exists(queue: JobStreams, job_id: int) -> bool:
    try:
        await queue.js.stream_info(stream_name(job_id))
        return True
    except NotFoundError:
        return False


async def dlq_exists(queue: JobStreams, job_id: int) -> bool:
    try:
        await queue.js.consumer_info(ADVISORY_STREAM, dlq_name(job_id))
        return True
    except NotFoundError:
        return False


# --- must show: the NATS contract ---------------------------------------------------------------


async def test_reserve_then_result_acks_so_nothing_is_redelivered(stack_factory, nats_queue: JobStreams) -> None:
    stack = stack_factory(**FAST)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 2)
    [first] = reserve(api, job.id)
    response = answer(api, job.id, first)
    body = response.json()
    assert body["status"] == "accepted" and body["job_id"] == job.id and body["results_queued"] == 1
    assert body["tasks"][0]["reply_subject"] == first["reply_subject"] and body["tasks"][0]["status"] == "queued"

    await asyncio.sleep(FAST["ack_wait_s"] + 0.3)
    later = reserve(api, job.id, batch_size=5)
    assert [t["image_id"] for t in later] == [str(int(first["image_id"]) + 1)]  # only the other image
    assert parse_ack_subject(later[0]["reply_subject"]).num_delivered == 1
    stats = await nats_queue.stats(job.id)
    assert (stats.redeliveries, stats.ack_pending, stats.deliveries) == (0, 1, 2)


async def test_task_without_result_is_redelivered_after_ack_wait(stack_factory) -> None:
    stack = stack_factory(**FAST)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 1)
    [task] = reserve(api, job.id)
    assert parse_ack_subject(task["reply_subject"]).num_delivered == 1
    assert reserve(api, job.id) == []  # reserved: nobody else gets it within ack_wait

    await asyncio.sleep(FAST["ack_wait_s"] + 0.2)
    [again] = reserve(api, job.id)
    assert again["image_id"] == task["image_id"]
    assert parse_ack_subject(again["reply_subject"]).num_delivered == 2
    assert stack.admin.job(job.id).redeliveries == 1


def test_result_posted_twice_is_stored_once_and_counted_as_duplicate(stack: DevStack, api: httpx.Client) -> None:
    job = stack.create_job(PIPELINE, 3)
    first, second = reserve(api, job.id, 2)
    answer(api, job.id, first, stack)
    answer(api, job.id, first, stack)
    # the first result wins, success or error: a later success does not replace an error
    assert post_results(api, job.id, (second["reply_subject"], error(second))).status_code == 200
    stack.wait_saved()
    answer(api, job.id, second, stack)

    stored = {r.image_id: r for r in stack.store.results(job.id)}
    assert set(stored) == {first["image_id"], second["image_id"]}
    assert (stored[first["image_id"]].kind, stored[first["image_id"]].duplicates) == ("ok", 1)
    assert (stored[second["image_id"]].kind, stored[second["image_id"]].duplicates) == ("error", 1)
    progress = stack.admin.job(job.id)
    assert (progress.results, progress.errors, progress.duplicates, progress.status) == (1, 1, 2, "STARTED")


async def test_max_deliver_exhausted_becomes_an_error_result_with_the_reaper(stack_factory, nats_queue: JobStreams) -> None:
    """Off by default (as Antenna, where a management command does it later); the bench turns it on."""
    stack = stack_factory(**FAST, reap_dead_letters=True)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 1)
    [task] = reserve(api, job.id)
    for delivery in (2, None):
        await asyncio.sleep(FAST["ack_wait_s"] + 0.2)
        tasks = reserve(api, job.id)  # a pull is what makes NATS notice the exhausted task
        if delivery:
            assert parse_ack_subject(tasks[0]["reply_subject"]).num_delivered == delivery
        else:
            assert tasks == []

    final = stack.admin.wait_final(job.id, timeout=5)
    assert (final.status, final.results, final.errors, final.dead_lettered) == ("FAILURE", 0, 1, 1)
    assert stack.dead_lettered(job.id) == 1
    [result] = stack.store.results(job.id)
    assert result.image_id == task["image_id"] and result.kind == "error" and result.dead_lettered
    assert result.payload == {
        "error": "task exceeded max_deliver (2 deliveries) without a result",
        "image_id": task["image_id"],
    }
    assert not await nats_queue.exists(job.id)


async def test_completed_job_is_success_with_stats_snapshot_and_streams_deleted(
    stack: DevStack, api: httpx.Client, nats_queue: JobStreams
) -> None:
    job = stack.create_job(PIPELINE, 3)
    tasks = reserve(api, job.id, 3)
    assert post_results(api, job.id, *[(t["reply_subject"], success(t)) for t in tasks[:2]]).status_code == 200
    assert post_results(api, job.id, (tasks[2]["reply_subject"], error(None, "corrupt"))).status_code == 200

    stack.wait_saved()
    done = stack.admin.job(job.id)  # complete with the save of its last image, not a housekeeping round later
    assert (done.status, done.results, done.errors) == ("SUCCESS", 2, 1)
    assert done.completed_at is not None and done.first_result_at <= done.completed_at
    assert (done.messages, done.deliveries, done.redeliveries, done.ack_pending) == (3, 3, 0, 0)
    assert not await stream_exists(nats_queue, job.id)
    assert not await dlq_exists(nats_queue, job.id)
    # a late duplicate for a finished job is accepted and counted, nothing else changes
    assert post_results(api, job.id, (tasks[0]["reply_subject"], success(tasks[0]))).status_code == 200
    stack.wait_saved()
    assert (stack.admin.job(job.id).duplicates, stack.admin.job(job.id).status) == (1, "SUCCESS")


async def test_cancel_deletes_stream_and_consumers(stack: DevStack, api: httpx.Client, nats_queue: JobStreams) -> None:
    job = stack.create_job(PIPELINE, 4)
    [task] = reserve(api, job.id)
    assert await nats_queue.exists(job.id) and await dlq_exists(nats_queue, job.id)

    cancelled = stack.admin.cancel(job.id)
    assert cancelled.status == "REVOKED" and cancelled.cancelled_at is not None
    assert not await stream_exists(nats_queue, job.id)
    assert not await nats_queue.exists(job.id)
    assert not await dlq_exists(nats_queue, job.id)
    assert cancelled.deliveries == 1  # the snapshot taken before the deletion
    assert reserve(api, job.id, 5) == []
    listed = api.get("jobs/", params={"ids_only": 1, "incomplete_only": 1, "limit": 10}).json()
    assert job.id not in [row["id"] for row in listed["results"]]
    # the worker that held a task may still answer it: accepted, stored, no error
    answer(api, job.id, task, stack)
    assert stack.admin.job(job.id).status == "REVOKED"


async def test_nats_down_answers_503_and_changes_nothing_then_recovers(stack_factory) -> None:
    stack = stack_factory(own_nats=True)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 2)
    [task] = reserve(api, job.id)

    stack.stop_nats()
    wait_for(lambda: not stack.antenna.plane.nats_connected, what="the API to notice NATS is down")
    down = api.post(f"jobs/{job.id}/tasks/", json={"batch_size": 1})
    assert down.status_code == 503 and "error" in down.json()
    # /result needs no NATS to queue (Antenna queues to Celery): accepted and saved; its ack waits for NATS
    assert post_results(api, job.id, (task["reply_subject"], success(task))).status_code == 200
    stack.wait_saved()
    assert [r.image_id for r in stack.store.results(job.id)] == [task["image_id"]]
    assert api.post("jobs/", json={"pipeline": PIPELINE, "image_urls": ["http://x/1.jpg"]}).status_code == 503
    assert [j.id for j in stack.admin.jobs()] == [job.id]  # reads still work: they come from the database

    stack.start_nats()  # same port and store: the stream and its consumer survive
    [other] = reserve(api, job.id)
    assert other["image_id"] != task["image_id"]
    answer(api, job.id, other, stack)
    assert stack.admin.job(job.id).status == "SUCCESS"


def test_api_survives_a_nats_restart(stack_factory) -> None:
    stack = stack_factory(own_nats=True)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 2)
    [task] = reserve(api, job.id)
    stack.restart_nats()
    answer(api, job.id, task, stack)
    [other] = reserve(api, job.id)
    answer(api, job.id, other, stack)
    assert stack.admin.job(job.id).status == "SUCCESS"


# --- must show: auth ------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "jobs/"),
    ("POST", "jobs/"),
    ("GET", "jobs/1/"),
    ("POST", "jobs/1/tasks/"),
    ("POST", "jobs/1/result/"),
    ("POST", "jobs/1/run/"),
    ("POST", "jobs/1/cancel/"),
    ("POST", "projects/1/pipelines/"),
]


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        (None, "Authentication credentials were not provided."),
        ("Bearer test-token", "Authentication credentials were not provided."),
        ("Token", "Invalid token header. No credentials provided."),
        ("Token a b", "Invalid token header. Token string should not contain spaces."),
        ("Token wrong-token", "Invalid token."),
    ],
)
def test_every_endpoint_needs_the_token(stack: DevStack, header: str | None, detail: str) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path in ENDPOINTS:
        response = httpx.request(method, f"{stack.api_url}/{path}", headers=headers, json={})
        if (method, path) == ("GET", "jobs/") and detail == "Authentication credentials were not provided.":
            assert response.status_code == 200  # Antenna lists jobs anonymously; a wrong token is still a 401
            continue
        assert response.status_code == 401, (method, path)
        assert response.json() == {"detail": detail}
        assert response.headers["WWW-Authenticate"] == "Token"


def test_images_need_no_token(stack: DevStack) -> None:
    assert httpx.get(f"{stack.base_url}/images/demo/64x48/a.jpg").status_code == 200


# --- bad input: a clear 4xx in Antenna's shape, nothing stored, nothing acked ---------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"batch_size": 0}, {"batch_size": ["Ensure this value is greater than or equal to 1."]}),
        ({"batch_size": "many"}, {"batch_size": ["A valid integer is required."]}),
        ({"batch_size": None}, {"batch_size": ["This field may not be null."]}),
        ({}, {"batch_size": ["This field is required."]}),
        ([1], {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]}),
    ],
)
def test_tasks_rejects_bad_bodies(stack: DevStack, api: httpx.Client, body: Any, expected: dict) -> None:
    job = stack.create_job(PIPELINE, 1)
    response = api.post(f"jobs/{job.id}/tasks/", json=body)
    assert (response.status_code, response.json()) == (400, expected)
    assert stack.admin.job(job.id).ack_pending == 0  # nothing was reserved


def test_malformed_json_is_a_drf_parse_error(stack: DevStack, api: httpx.Client) -> None:
    job = stack.create_job(PIPELINE, 1)
    for path in (f"jobs/{job.id}/tasks/", f"jobs/{job.id}/result/", "jobs/"):
        response = api.post(path, content=b'{"batch_size": ', headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.json()["detail"].startswith("JSON parse error - ")


def test_unknown_job_is_404(api: httpx.Client) -> None:
    for method, path, body in [
        ("GET", "jobs/999/", None),
        ("POST", "jobs/999/tasks/", {"batch_size": 1}),
        ("POST", "jobs/999/result/", {"results": []}),
        ("POST", "jobs/999/cancel/", None),
        ("GET", "jobs/not-a-number/", None),
    ]:
        response = api.request(method, path, json=body)
        assert (response.status_code, response.json()) == (404, {"detail": "Not found."}), path


def test_non_json_content_type_is_415(stack: DevStack, api: httpx.Client) -> None:
    job = stack.create_job(PIPELINE, 1)
    response = api.post(f"jobs/{job.id}/tasks/", content=b"batch_size=1", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415


async def test_bad_results_are_rejected_whole(stack: DevStack, api: httpx.Client, nats_queue: JobStreams) -> None:
    job = stack.create_job(PIPELINE, 3)
    good, spare = reserve(api, job.id, 2)
    cases = [
        ({"results": [{"result": success(good)}]}, {"results": [{"reply_subject": ["This field is required."]}]}),
        ({"results": [{"reply_subject": "", "result": success(good)}]}, {"results": [{"reply_subject": ["This field may not be blank."]}]}),
        ({"results": [{"reply_subject": good["reply_subject"], "result": "done"}]}, {"results": [{"result": ["Invalid data. Expected a dictionary, but got str."]}]}),
        ({"results": "all of them"}, {"results": ['Expected a list of items but got type "str".']}),
        ({}, {"results": ["This field is required."]}),
    ]
    for body, expected in cases:
        response = api.post(f"jobs/{job.id}/result/", json=body)
        assert (response.status_code, response.json()) == (400, expected), body

    # all or nothing: one valid result beside an invalid one is not stored and not acked
    broken = success(spare)
    del broken["detections"][0]["bbox"]["x2"]
    response = post_results(api, job.id, (good["reply_subject"], success(good)), (spare["reply_subject"], broken))
    assert response.status_code == 400
    assert response.json() == {"results": [{}, {"result": {"detections": [{"bbox": {"x2": ["This field is required."]}}]}}]}
    stack.wait_saved()
    assert stack.store.results(job.id) == []
    stats = await nats_queue.stats(job.id)
    assert stats.ack_pending == 2  # both still reserved: nothing was acked
    assert stack.admin.job(job.id).results == 0


def test_oversized_bodies_are_413_and_not_stored(stack_factory) -> None:
    stack = stack_factory(max_body_bytes=4096)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 1)
    [task] = reserve(api, job.id)
    big = success(task)
    big["errors"] = "x" * 5000
    declared = post_results(api, job.id, (task["reply_subject"], big))
    assert declared.status_code == 413 and "detail" in declared.json()

    def chunks():  # no Content-Length: the limit must hold on what actually arrives
        yield b'{"results": [{"reply_subject": "' + task["reply_subject"].encode() + b'", "result": {"error": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}}]}'

    streamed = api.post(f"jobs/{job.id}/result/", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert stack.store.results(job.id) == []


async def test_malformed_task_in_the_stream_is_handed_out_blank(
    stack: DevStack, api: httpx.Client, nats_queue: JobStreams
) -> None:
    job = stack.create_job(PIPELINE, 1)
    for body in (b"not json at all", b'{"id": 7, "image_url": ["x"]}'):
        await nats_queue.js.publish(f"job.{job.id}.tasks", body, stream=stream_name(job.id))
    tasks = reserve(api, job.id, 3)
    assert [(t["id"], t["image_id"], t["image_url"]) for t in tasks[1:]] == [("", "", ""), ("7", "", "")]
    assert all(parse_ack_subject(t["reply_subject"]).stream == stream_name(job.id) for t in tasks)


def test_tasks_of_a_job_not_started_or_not_async(stack: DevStack, api: httpx.Client) -> None:
    waiting = stack.create_job(PIPELINE, 2, start=False)
    assert waiting.status == "CREATED"
    assert reserve(api, waiting.id, 5) == []
    assert stack.admin.run(waiting.id).status == "STARTED"
    assert len(reserve(api, waiting.id, 5)) == 2

    internal = stack.create_job(PIPELINE, 1, dispatch_mode="internal")
    response = api.post(f"jobs/{internal.id}/tasks/", json={"batch_size": 1})
    assert (response.status_code, response.json()) == (400, ["Only async_api jobs have fetchable tasks"])


# --- job listing (Antenna's parameters) --------------------------------------------------------------


def test_ids_only_listing_is_random_with_limit_one(stack: DevStack, api: httpx.Client) -> None:
    ids = {stack.create_job(PIPELINE, 1, priority=p).id for p in (0, 5, 0)}
    seen = set()
    for _ in range(40):
        page = api.get("jobs/", params={"ids_only": 1, "incomplete_only": 1}).json()
        assert page["count"] == 3 and len(page["results"]) == 1 and page["previous"] is None
        assert page["next"] is not None and "offset=1" in page["next"]
        seen.add(page["results"][0]["id"])
        assert set(page["results"][0]) == {"id", "pipeline_slug", "priority"}
    assert seen == ids  # random order: every job comes up (1 in 3 * (2/3)^39 to miss one)


def test_listing_filters(stack: DevStack, api: httpx.Client) -> None:
    a = stack.create_job("moth_binary", 1)
    b = stack.create_job(PIPELINE, 1, priority=3)
    c = stack.create_job(PIPELINE, 1, dispatch_mode="sync_api")
    stack.admin.cancel(a.id)

    def ids(**params: Any) -> list[int]:
        return sorted(row["id"] for row in api.get("jobs/", params={"ids_only": 1, "limit": 10, **params}).json()["results"])

    assert ids() == [a.id, b.id, c.id]
    assert ids(incomplete_only=1) == [b.id, c.id]
    assert ids(pipeline__slug__in=f"moth_binary,{PIPELINE}") == [a.id, b.id, c.id]
    assert ids(pipeline__slug__in="moth_binary") == [a.id]
    assert ids(dispatch_mode="async_api", incomplete_only=1, pipeline__slug__in=PIPELINE) == [b.id]
    row = api.get("jobs/", params={"ids_only": 1, "dispatch_mode": "async_api", "incomplete_only": 1}).json()["results"][0]
    assert row == {"id": b.id, "pipeline_slug": PIPELINE, "priority": 3}


def test_full_listing_pages_like_drf(stack: DevStack, api: httpx.Client) -> None:
    for _ in range(3):
        stack.create_job(PIPELINE, 2)
    first = api.get("jobs/", params={"limit": 2}).json()
    assert first["count"] == 3 and [j["id"] for j in first["results"]] == [3, 2]  # newest first
    assert first["results"][0]["total"] == 2 and first["results"][0]["status"] == "STARTED"
    second = httpx.get(first["next"], headers=api.headers).json()
    assert [j["id"] for j in second["results"]] == [1] and second["next"] is None
    assert "offset" not in second["previous"]
    assert api.get("jobs/", params={"limit": "lots", "offset": "-3"}).json()["count"] == 3  # invalid: defaults


# --- jobs, pipelines, images, faults ------------------------------------------------------------------


def test_create_job_validation(stack: DevStack, api: httpx.Client) -> None:
    created = api.post(
        "jobs/", json={"pipeline": PIPELINE, "images": [{"url": "http://x/a.jpg", "id": 41}, {"url": "http://x/b.jpg"}], "id": 7}
    )
    assert created.status_code == 201
    assert created.json()["id"] == 7 and created.json()["total"] == 2
    assert [i.image_id for i in stack.store.images(7)] == ["41", "42"]  # assigned ids never collide with given ones
    cases = [
        ({"pipeline": PIPELINE, "image_urls": ["http://x/c.jpg"], "id": 7}, {"id": ["job 7 already exists"]}),
        ({"pipeline": "not a slug!", "image_urls": ["u"]}, "pipeline"),
        ({"pipeline": PIPELINE}, "non_field_errors"),
        ({"pipeline": PIPELINE, "image_urls": []}, "non_field_errors"),
        ({"pipeline": PIPELINE, "image_urls": ["u"], "priority": "high"}, {"priority": ["A valid integer is required."]}),
        ({"pipeline": PIPELINE, "images": [{"url": "u", "id": "1"}, {"url": "v", "id": "1"}]}, "images"),
    ]
    for body, expected in cases:
        response = api.post("jobs/", json=body)
        assert response.status_code == 400, body
        if isinstance(expected, str):
            assert expected in response.json(), response.json()
        else:
            assert response.json() == expected
    assert [j.id for j in stack.admin.jobs()] == [7]


def test_job_progress_is_live_while_active(stack: DevStack, api: httpx.Client) -> None:
    job = stack.create_job(PIPELINE, 3, priority=2)
    reserve(api, job.id, 2)
    live = stack.admin.job(job.id)
    assert (live.messages, live.pending, live.ack_pending, live.deliveries) == (3, 1, 2, 2)
    assert (live.priority, live.pipeline_slug, live.total) == (2, PIPELINE, 3)
    assert live.created_at <= live.started_at <= time.time() and live.first_result_at is None


def test_pipeline_registration_upserts(api: httpx.Client, stack: DevStack) -> None:
    pipeline = {"name": "Panama moths", "slug": "new_pipeline", "version": 1, "algorithms": [{"name": "d", "key": "d"}]}
    body = {"processing_service_name": "worker (host)", "pipelines": [pipeline]}
    created = api.post("projects/7/pipelines/", json=body)
    assert created.status_code == 201
    first = created.json()
    assert set(first) == {"timestamp", "success", "error", "pipelines", "pipelines_created", "algorithms_created"}
    assert (first["success"], first["error"], first["pipelines_created"], first["algorithms_created"]) == (True, None, ["new_pipeline"], ["d"])
    assert [p["slug"] for p in first["pipelines"]] == ["new_pipeline"]
    second = api.post("projects/7/pipelines/", json=body).json()
    assert (second["pipelines_created"], second["algorithms_created"]) == ([], [])
    assert [p["slug"] for p in stack.store.pipelines(7)] == ["new_pipeline"]
    assert stack.store.algorithm_keys(7, "new_pipeline") == {"d"}
    bad = api.post("projects/1/pipelines/", json={"pipelines": [{"slug": "x"}]})
    assert bad.status_code == 400 and "processing_service_name" in bad.json()


def test_api_errors_fault_answers_503_for_a_while(stack: DevStack, api: httpx.Client) -> None:
    stack.fail_api(0.5)
    assert api.get("jobs/").status_code == 503
    assert httpx.get(f"{stack.base_url}/images/demo/64x48/a.jpg").status_code == 200  # images stay up
    time.sleep(0.6)
    assert api.get("jobs/").status_code == 200


def test_demo_images_are_served(stack: DevStack) -> None:
    frame = httpx.get(f"{stack.base_url}/images/demo/320x240/frame-1.jpg")
    assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(frame.content)).size == (320, 240)
    assert httpx.get(f"{stack.base_url}/images/demo/320x240/frame-1.jpg").content == frame.content
    assert httpx.get(f"{stack.base_url}/images/missing/frame-1.jpg").status_code == 404
    assert httpx.get(f"{stack.base_url}/images/demo/99999x240/frame-1.jpg").status_code == 404
    corrupt = httpx.get(f"{stack.base_url}/images/corrupt/frame-1.jpg")
    assert corrupt.status_code == 200 and corrupt.headers["content-type"] == "image/jpeg"
    with pytest.raises(OSError):
        Image.open(io.BytesIO(corrupt.content)).load()


async def test_async_admin_drives_a_job(stack: DevStack, api: httpx.Client) -> None:
    async with AsyncAntennaAdmin(stack.api_url, stack.token) as admin:
        job = await admin.create_job(PIPELINE, image_urls=[f"{stack.base_url}/images/demo/64x48/a.jpg"], priority=1)
        assert [j.id for j in await admin.jobs(incomplete_only=True, pipelines=[PIPELINE])] == [job.id]
        [task] = reserve(api, job.id)
        answer(api, job.id, task)
        done = await admin.wait_final(job.id, timeout=5)
        assert isinstance(admin, AntennaClient)  # one client family: the admin is an AntennaClient
        assert (done.status, done.results, done.priority) == ("SUCCESS", 1, 1)
        with pytest.raises(AntennaError) as missing:
            await admin.job(12345)
        assert missing.value.status == 404 and isinstance(missing.value, Rejected)


async def test_results_for_tasks_reserved_straight_from_jetstream(stack: DevStack, api: httpx.Client, nats_queue: JobStreams) -> None:
    """The fair worker binds to the consumer itself; its reply subjects are as good as /tasks' ones."""
    job = stack.create_job(PIPELINE, 2)
    reservations = await nats_queue.reserve(job.id, 2)
    tasks = [{**r.task.model_dump(), "reply_subject": r.reply_subject} for r in reservations]
    assert post_results(api, job.id, *[(t["reply_subject"], success(t)) for t in tasks]).status_code == 200
    stack.wait_saved()
    assert stack.admin.job(job.id).status == "SUCCESS"


def test_projects_are_listed_as_antennas_project_viewset(stack: DevStack, api: httpx.Client) -> None:
    """``GET /projects/``: what ``ami worker register`` reads with no project named (every ``results[].id``)."""
    first = api.get("projects/").json()
    assert (first["count"], first["next"], first["previous"]) == (1, None, None)
    [default] = first["results"]
    assert set(default) >= {"id", "name", "description", "details", "deployments_count", "created_at", "updated_at",
                            "image", "draft", "user_permissions"}
    assert (default["id"], default["name"]) == (1, "Default project")
    assert httpx.get(default["details"], headers=api.headers).json()["id"] == 1
    pipeline = {"name": "P", "slug": "p_for_project_5", "version": 1, "algorithms": []}
    assert api.post("projects/5/pipelines/", json={"processing_service_name": "s", "pipelines": [pipeline]}).status_code == 201
    stack.create_job(PIPELINE, 1, project_id=3)
    listed = api.get("projects/").json()
    assert [p["id"] for p in listed["results"]] == [1, 3, 5]
    page = api.get("projects/", params={"limit": 2}).json()
    assert page["count"] == 3 and [p["id"] for p in page["results"]] == [1, 3] and "offset=2" in page["next"]
    assert httpx.get(f"{stack.api_url}/projects/").status_code == 200  # anonymous read, as Antenna
    assert api.get("projects/99/").status_code == 404
