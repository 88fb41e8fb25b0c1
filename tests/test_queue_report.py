"""The queue-report flow against a real local stack: its table and progress artifacts, read back from Prefect.

Jobs are processed by hand through the API (reserve, answer) so every number is known: the report
must show the field report's columns, progress, the images/s between two reports, an ETA, the
workers that served each job, and a last progress artifact for a job that finished in between.
Its parts on their own: tests/test_queue_report_rows.py (pure), tests/test_queue_report_readers.py.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

from antenna_flows.artifact_keys import QUEUE_REPORT, job_progress
from antenna_flows.flows.queue_report import queue_report
from antenna_flows.queue_report.rows import human_duration, parse_time, table_rows
from antenna_flows.tasks.artifacts import publish_job_table

pytestmark = pytest.mark.prefect

PIPELINE = "sim-panama_moths_2024"  # the sim model serves pipelines of its own


def success(task: dict[str, Any]) -> dict[str, Any]:
    return {
        "pipeline": PIPELINE,
        "algorithms": {},
        "total_time": 0.1,
        "source_images": [{"id": task["image_id"], "url": task["image_url"]}],
        "detections": [],
    }


def process(api: httpx.Client, job_id: int, answer: int, errors: int = 0, hold: int = 0) -> None:
    """Reserve answer+errors+hold tasks; answer `answer` with results and `errors` with errors; hold the rest."""
    response = api.post(f"jobs/{job_id}/tasks/", json={"batch_size": answer + errors + hold})
    tasks = response.json()["tasks"]
    assert len(tasks) == answer + errors + hold, response.text
    results = [{"reply_subject": t["reply_subject"], "result": success(t)} for t in tasks[:answer]]
    results += [
        {"reply_subject": t["reply_subject"], "result": {"error": "image download failed", "image_id": t["image_id"]}}
        for t in tasks[answer : answer + errors]
    ]
    if results:
        assert api.post(f"jobs/{job_id}/result/", json={"results": results}).status_code == 200


def wait_job(api: httpx.Client, job_id: int, check, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"jobs/{job_id}/").json()
        if check(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never got there: {job}"
        time.sleep(0.05)


@flow(name="fake-workers")
async def fake_workers() -> None:
    await publish_job_table("gpu-a-gpu0", [{"job_id": 501, "images": 6, "errors": 1}], {}, final=False)
    await publish_job_table("gpu-b-gpu1", [{"job_id": 501, "images": 0, "errors": 0}, {"job_id": 502, "images": 3}], {}, False)


async def latest(client, key: str):
    found = await client.read_latest_artifacts(
        artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key]))
    )
    assert found, f"no artifact {key}"
    return found[0]


async def report_rows(client) -> dict[int, dict[str, Any]]:
    artifact = await latest(client, QUEUE_REPORT)
    assert artifact.type == "table"
    return {r["job_id"]: r for r in table_rows(artifact.data)}


@pytest.fixture
def stack(stack_factory):
    """ack_wait 60 s: the task the test holds stays reserved (ack_pending) across both reports."""
    return stack_factory(ack_wait_s=60.0)


@pytest.fixture
def api(stack):
    with httpx.Client(base_url=stack.api_url + "/", headers={"Authorization": f"Token {stack.token}"}, timeout=30) as client:
        yield client


async def test_queue_report_table_and_progress_artifacts(prefect_server, stack, api, monkeypatch):
    monkeypatch.setenv("AMI_ANTENNA_API_TOKEN", stack.token)  # as on a worker host: never a parameter
    big = stack.create_job(PIPELINE, 20, job_id=501)
    small = stack.create_job(PIPELINE, 10, job_id=502)
    process(api, big.id, answer=6, errors=1, hold=1)  # 7 answered, 1 reserved and held, 12 waiting
    process(api, small.id, answer=3)
    wait_job(api, big.id, lambda j: j["results"] == 6 and j["errors"] == 1 and j["ack_pending"] == 1)
    wait_job(api, small.id, lambda j: j["results"] == 3 and j["ack_pending"] == 0)
    # A worker's per-job table, as the fair worker publishes it: the report names who served each job.
    await fake_workers()

    params = dict(antenna_api_url=stack.api_url, nats_url=stack.nats_url)
    first = await queue_report(**params)
    assert first["jobs"] == 2 and first["nats"] is True
    async with get_client() as client:
        rows = await report_rows(client)
        assert set(rows) == {501, 502}
        a = rows[501]
        assert (a["msgs"], a["pending"], a["ack_pending"], a["redelivered"]) == (20, 12, 1, 0), a
        assert (a["results"], a["errors"], a["processed"], a["total"], a["progress_pct"]) == (6, 1, 7, 20, 35.0), a
        assert a["images_per_s_1m"] is None and a["eta"] == ""  # no earlier reading yet
        assert a["workers"] == "gpu-a-gpu0", a  # gpu-b-gpu1 held no image of 501
        b = rows[502]
        assert (b["msgs"], b["pending"], b["ack_pending"], b["processed"], b["progress_pct"]) == (10, 7, 0, 3, 30.0), b
        assert b["workers"] == "gpu-b-gpu1"
        progress = await latest(client, job_progress(501))
        assert progress.type == "progress" and float(progress.data) == 35.0
        assert "7 of 20 images" in progress.description

    # A minute of work, compressed: 4 more answers for 501, and 502 finishes.
    time.sleep(1.5)
    process(api, big.id, answer=4)
    process(api, small.id, answer=7)
    wait_job(api, big.id, lambda j: j["results"] == 10)
    wait_job(api, small.id, lambda j: j["status"] == "SUCCESS")

    second = await queue_report(**params)
    assert second["jobs"] == 1 and second["finished"] == [502]
    async with get_client() as client:
        rows2 = await report_rows(client)
        assert set(rows2) == {501}
        a2 = rows2[501]
        elapsed = (parse_time(a2["read_at"]) - parse_time(a["read_at"])).total_seconds()
        assert elapsed >= 1.5
        assert a2["images_per_s_1m"] == pytest.approx(4 / elapsed, abs=0.002), (a2, elapsed)
        assert (a2["processed"], a2["pending"], a2["progress_pct"]) == (11, 8, 55.0)
        assert a2["eta_s"] == pytest.approx(9 / (4 / elapsed), abs=0.051), a2  # the row rounds to 0.1 s
        assert a2["eta"] == human_duration(a2["eta_s"])
        assert float((await latest(client, job_progress(501))).data) == 55.0
        done = await latest(client, job_progress(502))
        assert float(done.data) == 100.0 and "SUCCESS" in done.description
