"""The fair worker flow: one long-running flow run per GPU.

    fair-worker (one run per worker; rolls over after max_runtime_s, a day by default)
    ├── serve-window       (task: every reservation round and result post for up to window_s,
    │                       each with its own retries; returns counts per job and retries taken)
    ├── inference-session  (subflow: a stretch of continuous GPU work, at most session_max_s)
    ├── serve-window ...
    ├── inference-session ...
    └── artifact: worker-<name>-jobs (per-job images, GPU seconds, share, throughput)

What Prefect records grows with time, not images: a task run per window of steady work (none
while idle), a subflow run per session, an artifact every few minutes: ~20 KB of Prefect database
per task run, so with 30 s windows well under 100 MB per GPU-day at any image rate. Prefect is not
the data plane: when its API cannot be reached the work goes on and the record catches up
(:mod:`antenna_flows.orchestration.prefect`).

SIGTERM (a supervisor, ``kill``, or a cancel from the UI through the runner) stops the worker
gracefully, as in plain runs: the batch in flight is finished and posted, the rest released, and
the run ends Completed (Cancelled when the UI asked for it), never Crashed
(:mod:`antenna_flows.orchestration.stopping`).

Deploy it to a work pool with ``prefect deploy`` (see prefect.yaml) or run it directly:
``antenna-flows worker``.
"""

from __future__ import annotations

from typing import Any

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, get_run_logger

from antenna_flows.models import load_model
from antenna_flows.orchestration.prefect import PrefectOrchestrator, run_session
from antenna_flows.orchestration.runs import finish_run, quiet_task_run_logs, worker_settings
from antenna_flows.orchestration.stopping import stops_on_sigterm, take_over_sigterm
from antenna_flows.orchestration.windows import WINDOW_S
from antenna_flows.tasks.artifacts import publish_job_table
from antenna_flows.tasks.serve_window import serve_window
from antenna_flows.worker import FairWorker


@flow(name="inference-session", flow_run_name="{worker}-session-{number}", validate_parameters=False,
      persist_result=False)
async def inference_session(worker: str, number: int) -> dict[str, Any]:
    """A stretch of continuous GPU work for one worker: run batches and post them until idle or too long."""
    take_over_sigterm()  # this subflow's engine re-armed Prefect's SIGTERM bridge: the worker's stop comes first
    summary = await run_session(worker)
    if not summary.get("skipped"):
        get_run_logger().info("session %d: %s", number, summary)
    return summary


@flow(name="fair-worker", flow_run_name="{worker_name}", validate_parameters=True, persist_result=False)
async def fair_worker(
    worker_name: str | None = None,
    pipelines: list[str] | None = None,
    antenna_api_url: str | None = None,
    token_secret_block: str | None = None,
    nats_url: str | None = None,
    model_kind: str | None = None,
    device: str | None = None,
    max_batch_size: int | None = None,
    max_runtime_s: float | None = None,
    settings_overrides: dict[str, Any] | None = None,
    window_s: float | None = None,
    rollover: bool = True,
) -> Any:
    """Serve every incomplete job of these pipelines fairly on one GPU until stopped.

    Unset parameters come from the environment (``AMI_*``) and ``.env``; see
    ``antenna-flows worker --help`` for every knob. The API token is never a
    parameter (the Prefect API stores parameters): it comes from
    ``AMI_ANTENNA_API_TOKEN`` on the worker host or from the Prefect Secret
    block named by ``token_secret_block``.

    ``window_s``: seconds of work one ``serve-window`` task run records (default 30).
    ``rollover``: when ``max_runtime_s`` (default a day) ends a run of a deployment,
    start the next run of it with the same parameters.
    """
    settings = await worker_settings({
        "worker_name": worker_name, "pipelines": pipelines, "antenna_api_url": antenna_api_url, "nats_url": nats_url,
        "model_kind": model_kind, "device": device, "max_batch_size": max_batch_size, "max_runtime_s": max_runtime_s,
        **(settings_overrides or {}),
    }, token_secret_block)
    quiet_task_run_logs()
    logger = get_run_logger()
    model = load_model(settings)
    orchestrator = PrefectOrchestrator(settings, serve_window=serve_window, session_flow=inference_session,
                                       publish_table=publish_job_table, window_s=window_s or WINDOW_S)
    worker = FairWorker(settings, model, orchestrator)
    logger.info("worker %s starting (model %s, pipelines %s)", settings.worker_name, model.kind, sorted(worker.served))
    try:
        with stops_on_sigterm(settings.worker_name, worker.stop):
            totals = await worker.run()
    finally:
        await orchestrator.close()
    logger.info("worker %s stopped (%s): %s", settings.worker_name, worker.stop_reason, totals)
    return await finish_run(worker.stop_reason, totals, rollover, logger)
