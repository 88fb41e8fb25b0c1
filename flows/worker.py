"""The fair worker flow: one long-running flow run per GPU.

    fair-worker (one run per worker, runs until stopped)
    ├── reserve-tasks      (task, retries: a few tasks from the jobs next in fair order)
    ├── inference-session  (subflow: a stretch of continuous GPU work)
    │   ├── post-results   (task, retries + backoff: one batch's results, a request per job)
    │   └── ...
    ├── reserve-tasks ...
    ├── inference-session ...
    └── artifact: worker-<name>-jobs (per-job images, GPU seconds, share, throughput)

Deploy it to a work pool with ``prefect deploy`` (see prefect.yaml) or run it
directly: ``antenna-flows worker``.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, get_run_logger
from prefect.tasks import exponential_backoff

from antenna_flows.models import load_model
from antenna_flows.settings import WorkerSettings
from antenna_flows.worker import FairWorker
from tasks.queue import reserve_tasks
from tasks.report import publish_job_table
from tasks.results import post_results

# Session bodies by worker name: a subflow's parameters are recorded by the
# Prefect API, so the subflow receives names, not live objects.
_SESSIONS: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}


@flow(name="inference-session", flow_run_name="{worker}-session-{number}", validate_parameters=False,
      persist_result=False)
async def inference_session(worker: str, number: int) -> dict[str, Any]:
    """A stretch of continuous GPU work for one worker: run batches and post them until idle or too long."""
    summary = await _SESSIONS[worker]()
    get_run_logger().info("session %d: %s", number, summary)
    return summary


class PrefectOrchestrator:
    """Sessions as subflow runs, reservations and posts as task runs, reports as table artifacts."""

    name = "prefect"

    def __init__(self, settings: WorkerSettings):
        self.worker = settings.worker_name
        self._post = post_results.with_options(
            retries=settings.post_retries,
            retry_delay_seconds=exponential_backoff(settings.post_retry_delay_s)(settings.post_retries),
        )

    async def session(self, fn: Callable[[], Awaitable[dict[str, Any]]], number: int) -> dict[str, Any]:
        _SESSIONS[self.worker] = fn
        try:
            return await inference_session(self.worker, number)
        finally:
            _SESSIONS.pop(self.worker, None)

    async def reserve(self, fn: Callable[[dict[int, int]], Awaitable[int]], wants: dict[int, int]) -> int:
        return await reserve_tasks(fn, wants)

    async def post(self, fn: Callable[[], Awaitable[None]], label: str) -> None:
        await self._post(fn, label)

    async def report(self, worker: str, rows: list[dict[str, Any]], totals: dict[str, Any], final: bool) -> None:
        await publish_job_table(worker, rows, totals, final)


async def _secret(block_name: str) -> str:
    from prefect.blocks.system import Secret

    secret = await Secret.aload(block_name)
    return str(secret.get())


def quiet_task_run_logs() -> None:
    """Task runs' state changes are in the UI already; a log line each would double the API traffic."""
    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)


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
) -> dict[str, Any]:
    """Serve every incomplete job of these pipelines fairly on one GPU until stopped.

    Unset parameters come from the environment (``AMI_*``) and ``.env``; see
    ``antenna-flows worker --help`` for every knob. The API token is never a
    parameter (the Prefect API stores parameters): it comes from
    ``AMI_ANTENNA_API_TOKEN`` on the worker host or from the Prefect Secret
    block named by ``token_secret_block``.
    """
    given = {
        "worker_name": worker_name,
        "pipelines": pipelines,
        "antenna_api_url": antenna_api_url,
        "antenna_api_token": await _secret(token_secret_block) if token_secret_block else None,
        "nats_url": nats_url,
        "model_kind": model_kind,
        "device": device,
        "max_batch_size": max_batch_size,
        "max_runtime_s": max_runtime_s,
        **(settings_overrides or {}),
    }
    settings = WorkerSettings(**{k: v for k, v in given.items() if v is not None})
    quiet_task_run_logs()
    logger = get_run_logger()
    model = load_model(settings)
    worker = FairWorker(settings, model, PrefectOrchestrator(settings))
    logger.info("worker %s starting (model %s, pipelines %s)", settings.worker_name, model.kind, sorted(worker.served))
    totals = await worker.run()
    logger.info("worker %s stopped (%s): %s", settings.worker_name, worker.stop_reason, totals)
    return totals
