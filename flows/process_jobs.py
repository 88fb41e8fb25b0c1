"""Ad-hoc runs: put a spare GPU on named jobs until they are done, then exit.

    prefect deployment run process-jobs/gpu -p job_ids='[12,13]' -p device=cuda:1

    process-jobs (one run, by hand)
    └── fair-worker (subflow: the ordinary worker with job_ids + exit_when_done)

The worker serves only those jobs (fairly among them, with the usual reservation budget, so it
shares their queues with the fleet without redeliveries) and stops once none of them is incomplete.
"""

from __future__ import annotations

from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, get_run_logger

from antenna_flows.flows.worker import fair_worker


def worker_name_for(job_ids: list[int], given: str | None) -> str:
    if given:
        return given
    import socket

    return f"{socket.gethostname()}-jobs-{'-'.join(str(j) for j in job_ids[:5])}{'-etc' if len(job_ids) > 5 else ''}"


@flow(name="process-jobs", flow_run_name="jobs-{job_ids}", persist_result=False)
async def process_jobs(
    job_ids: list[int],
    device: str | None = None,
    model_kind: str | None = None,
    pipelines: list[str] | None = None,
    worker_name: str | None = None,
    antenna_api_url: str | None = None,
    nats_url: str | None = None,
    token_secret_block: str | None = None,
    max_runtime_s: float | None = None,
    settings_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Serve only ``job_ids`` on this GPU and stop once none of them is incomplete.

    ``max_runtime_s`` bounds the run whatever happens (unset: until the jobs are done). Other
    parameters as for ``fair-worker``; the API token comes from the host's environment or the
    Secret block ``token_secret_block``, never from a parameter.
    """
    if not job_ids:
        raise ValueError("job_ids: give at least one job id, e.g. -p job_ids='[12,13]'")
    ids = sorted({int(j) for j in job_ids})
    overrides = {**(settings_overrides or {}), "job_ids": ids, "exit_when_done": True}
    name = worker_name_for(ids, worker_name)
    get_run_logger().info("worker %s on jobs %s until they are done", name, ids)
    return await fair_worker(
        worker_name=name,
        pipelines=pipelines,
        antenna_api_url=antenna_api_url,
        token_secret_block=token_secret_block,
        nats_url=nats_url,
        model_kind=model_kind,
        device=device,
        max_runtime_s=max_runtime_s,
        settings_overrides=overrides,
        rollover=False,  # an ad-hoc run ends with its jobs (or max_runtime_s): nothing to start after it
    )
