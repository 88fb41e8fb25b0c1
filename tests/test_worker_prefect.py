"""The worker as Prefect runs it: one flow run, session subflows, window task runs, a table artifact.

One Prefect test server for this module (``prefect_test_harness`` takes ~12 s
to start), the real local Antenna and nats-server beside it.
"""

from __future__ import annotations

from typing import Any

import pytest

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter

from antenna_lab.antenna.admin import AsyncAntennaAdmin
from antenna_lab.bench.drain_flow import drain_worker
from antenna_flows.flows.worker import fair_worker
from antenna_flows.artifact_keys import worker_table

pytestmark = pytest.mark.prefect

PIPELINE = "sim-panama_moths_2024"  # the sim model serves pipelines of its own


def overrides(stack: Any, **extra: Any) -> dict[str, Any]:
    values = dict(
        antenna_api_url=stack.api_url,
        nats_url=stack.nats_url,
        model_kind="sim",
        sim_seconds_per_image=0.005,
        sim_seconds_per_batch=0.005,
        discovery_interval_s=0.2,
        session_idle_s=0.5,
        max_batch_size=4,
    )
    values.update(extra)
    return values


async def test_fair_worker_flow_records_sessions_tasks_and_a_job_table(prefect_server, stack, monkeypatch):
    monkeypatch.setenv("AMI_ANTENNA_API_TOKEN", stack.token)  # secrets come from the environment, not parameters
    job = stack.create_job(PIPELINE, 12, job_id=301)
    other = stack.create_job(PIPELINE, 5, job_id=302, missing=1)
    worker_name = "prefect-test-worker"
    totals = await fair_worker(worker_name=worker_name, settings_overrides=overrides(stack, max_runtime_s=4.0))
    assert totals["images"] == 16 and totals["errors"] == 1

    async with AsyncAntennaAdmin(stack.api_url, stack.token) as admin:
        done = [await admin.job(j) for j in (job.id, other.id)]
    assert [(j.results, j.errors, j.duplicates, j.redeliveries) for j in done] == [(12, 0, 0, 0), (4, 1, 0, 0)]

    async with get_client() as client:
        runs = await client.read_flow_runs()
        worker_runs = [r for r in runs if r.name == worker_name]
        assert len(worker_runs) == 1 and worker_runs[0].state.is_completed()
        assert stack.token not in str(worker_runs[0].parameters)  # the secret never reaches the Prefect API
        sessions = [r for r in runs if r.name.startswith(f"{worker_name}-session-")]
        assert sessions and all(s.state.is_completed() for s in sessions)
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in [*worker_runs, *sessions]]})
        )
        # Prefect's record grows with time, not images: one serve-window task run per window of
        # work (30 s by default: this run fits in one or two), holding every reservation round and
        # post, with counts per job and retries in its Completed state.
        # (Prefect adds one task run per subflow call in its parent: ``inference-session-<n>``.)
        windows = [t for t in task_runs if not t.name.startswith("inference-session-")]
        assert windows and all(t.name.startswith(f"{worker_name}-window-") for t in windows), windows
        assert len(windows) <= 2 < totals["batches"]
        assert all(t.state.is_completed() for t in windows)
        messages = " ".join(t.state.message or "" for t in windows)
        assert "posts (" in messages and "job 301:" in messages and "job 302:" in messages, messages
        artifact = await client.read_latest_artifacts()
        ours = [a for a in artifact if a.key == worker_table(worker_name)]
        assert ours, [a.key for a in artifact]
        rows = ours[0].data if isinstance(ours[0].data, list) else __import__("json").loads(ours[0].data)
        by_job = {r["job_id"]: r for r in rows}
        assert by_job[301]["images"] == 12 and by_job[302]["errors"] == 1


async def test_drain_worker_flow_runs_the_baseline(prefect_server, stack, monkeypatch):
    monkeypatch.setenv("AMI_ANTENNA_API_TOKEN", stack.token)
    job = stack.create_job(PIPELINE, 6, job_id=311)
    totals = await drain_worker(
        worker_name="prefect-drain",
        settings_overrides=overrides(stack, max_runtime_s=3.0),
    )
    assert totals["images"] == 6
    async with AsyncAntennaAdmin(stack.api_url, stack.token) as admin:
        assert (await admin.job(job.id)).results == 6
