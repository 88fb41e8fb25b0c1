"""The fair worker flow: one long-running flow run per GPU.

    fair-worker (one run per worker; rolls over after max_runtime_s, a day by default)
    ├── serve-window       (task: every reservation round and result post for up to window_s,
    │                       each with its own retries; returns counts per job and retries taken)
    ├── inference-session  (subflow: a stretch of continuous GPU work, at most session_max_s)
    ├── serve-window ...
    ├── inference-session ...
    └── artifact: worker-<name>-jobs (per-job images, GPU seconds, share, throughput)

What Prefect records grows with time, not images: a task run per window of
steady work (none while idle), a subflow run per session, an artifact every
few minutes: ~20 KB of Prefect database per task run, so with 30 s windows
well under 100 MB per GPU-day at any image rate.

Prefect is not the data plane: when its API cannot be reached, units of work
run plainly (one warning line), sessions run without a subflow run, reports
are dropped with a log line; the record resumes when the API answers.

SIGTERM (a supervisor, ``kill``, or a cancel from the UI through the runner)
stops the worker gracefully, as in plain runs: the batch in flight is
finished and posted, the rest released, and the run ends Completed
(Cancelled when the UI asked for it), never Crashed.

Deploy it to a work pool with ``prefect deploy`` (see prefect.yaml) or run it
directly: ``antenna-flows worker``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any, Awaitable, Callable

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled

from antenna_flows.models import load_model
from antenna_flows.orchestration import backoff_delays
from antenna_flows.settings import WorkerSettings
from antenna_flows.worker import FairWorker
from antenna_flows.tasks.queue import QUEUES, WINDOW_S, WorkQueue, jobs_of_label, serve_window
from antenna_flows.tasks.report import publish_job_table

log = logging.getLogger(__name__)

REPORT_EVERY_S = 300.0  # a running worker's table artifact at most this often (final: always): its rows grow with jobs seen
REPORT_TIMEOUT_S = 10.0  # an artifact write waits no longer (the API may be down)
SESSION_START_GRACE_S = 2.0  # a session subflow not started by then runs without its record
FIRST_SESSION_GRACE_S = 15.0  # the first opens before any work waits on it (start-up, often CPU-bound)
SESSION_END_GRACE_S = 1.0  # the work of a session is done: wait no longer for its record to close
PLAIN_SESSIONS_FOR_S = 60.0  # after one could not start: sessions run plainly this long, then try again
RESERVE_RETRIES = 3
RESERVE_RETRY_DELAY_S = 0.1

# Session bodies by worker name: a subflow's parameters are recorded by the
# Prefect API, so the subflow receives names, not live objects.
_SESSIONS: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}


@flow(name="inference-session", flow_run_name="{worker}-session-{number}", validate_parameters=False,
      persist_result=False)
async def inference_session(worker: str, number: int) -> dict[str, Any]:
    """A stretch of continuous GPU work for one worker: run batches and post them until idle or too long."""
    take_over_sigterm()  # this subflow's engine re-armed Prefect's SIGTERM bridge: the worker's stop comes first
    summary = await _SESSIONS[worker]()
    if not summary.get("skipped"):
        get_run_logger().info("session %d: %s", number, summary)
    return summary


# SIGTERM and cancels: flows/stopping.py (the worker's graceful stop, not Prefect's crash).
from antenna_flows.flows.stopping import _STOPPERS, _cancel_requested, _on_sigterm, graceful_sigterm, take_over_sigterm  # noqa: E402,F401

# --- the orchestrator -------------------------------------------------------------------------


class PrefectOrchestrator:
    """Windows of units as task runs, sessions as subflow runs, reports as table artifacts.

    Construct it inside the worker's flow run: windows are recorded as its task runs.
    """

    name = "prefect"

    def __init__(self, settings: WorkerSettings, window_s: float = WINDOW_S, report_every_s: float = REPORT_EVERY_S):
        self.worker = settings.worker_name
        self.settings = settings
        self.report_every_s = report_every_s
        self.queue = WorkQueue(self.worker, window_s=window_s, open_window=self._open_window,
                               context=contextvars.copy_context())
        QUEUES[self.worker] = self.queue
        self._last_report = 0.0
        self._reporting: asyncio.Task[None] | None = None
        self._late: set[asyncio.Task[Any]] = set()
        self._session_warned = False
        self._plain_sessions_until = 0.0
        self._unclosed: list[Any] = []  # session runs left Running by an API outage

    async def _open_window(self, number: int) -> Any:
        return await serve_window(self.worker, number, self.queue.window_s)

    # --- units of work ---------------------------------------------------------------------

    async def reserve(self, fn: Callable[[dict[int, int]], Awaitable[int]], wants: dict[int, int]) -> int:
        label = "reserve " + ", ".join(f"job {j} x{n}" for j, n in wants.items())
        return await self.queue.submit("reserve", lambda: fn(wants), backoff_delays(RESERVE_RETRIES, RESERVE_RETRY_DELAY_S),
                                       label, dict(wants))

    async def post(self, fn: Callable[[], Awaitable[None]], label: str, counts: dict[int, int] | None = None) -> None:
        delays = backoff_delays(self.settings.post_retries, self.settings.post_retry_delay_s)
        await self.queue.submit("post", fn, delays, label, dict(counts) if counts else jobs_of_label(label))

    async def session(self, fn: Callable[[], Awaitable[dict[str, Any]]], number: int) -> dict[str, Any]:
        """The session as a subflow run; run plainly if Prefect cannot start one in time, never twice."""
        if time.monotonic() < self._plain_sessions_until:  # Prefect was unreachable a moment ago
            return await fn()
        claim: dict[str, Any] = {}
        started, finished = asyncio.Event(), asyncio.Event()

        async def body() -> dict[str, Any]:
            if "plain" in claim:  # started too late: the session already ran without its record
                return {"session": number, "skipped": True}
            claim["subflow"] = True
            context = FlowRunContext.get()
            claim["run_id"] = context.flow_run.id if context and context.flow_run else None
            started.set()
            try:
                claim["result"] = result = await fn()
            finally:
                finished.set()
            return result

        _SESSIONS[self.worker] = body
        run = asyncio.create_task(self._subflow(number), name=f"{self.worker}-session-{number}")
        waiter = asyncio.create_task(started.wait())
        grace = FIRST_SESSION_GRACE_S if number == 1 else SESSION_START_GRACE_S
        await asyncio.wait({run, waiter}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if "subflow" in claim:
            ended = asyncio.create_task(finished.wait())
            await asyncio.wait({run, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                # The work is done; the subflow's record is being finished. Wait a moment for it,
                # not for an API that may be down (the record finishes or fails on its own).
                await asyncio.wait({run}, timeout=SESSION_END_GRACE_S)
            ended.cancel()
            if not run.done() and "result" in claim:
                self._plain_sessions_until = time.monotonic() + PLAIN_SESSIONS_FOR_S
                self._warn_session(f"session {number} record not closed within {SESSION_END_GRACE_S:g}s")
                self._track_late(run, claim.get("run_id"))
                return claim["result"]
            try:
                return await run
            except TerminationSignal:
                # Prefect's bridge fired before this subflow's body re-armed ours; the engine re-sent
                # the signal to the worker's handler, which is stopping the worker.
                log.warning("worker %s: SIGTERM as session %d started; stopping gracefully", self.worker, number)
                return {"session": number, "interrupted": True}
            except Exception as exc:  # noqa: BLE001
                if "result" in claim:  # the work is done; only its record failed
                    self._warn_session(f"session {number} record failed: {exc!r}")
                    return claim["result"]
                raise
        claim["plain"] = True
        self._plain_sessions_until = time.monotonic() + PLAIN_SESSIONS_FOR_S
        if run.done():
            exc = run.exception()
            if isinstance(exc, TerminationSignal):
                return {"session": number, "interrupted": True}
            self._warn_session(f"session {number} subflow failed to start: {exc!r}")
        else:
            self._warn_session(f"session {number} subflow not started within {grace:g}s")
            self._track_late(run)  # it will find the session claimed and end at once
        return await fn()

    def _track_late(self, run: asyncio.Task[Any], run_id: Any = None) -> None:
        def done(task: asyncio.Task[Any]) -> None:
            self._late.discard(task)
            if task.cancelled() or task.exception() is not None:
                if run_id is not None:
                    self._unclosed.append(run_id)
                if not task.cancelled():
                    log.debug("worker %s: late session record: %r", self.worker, task.exception())

        self._late.add(run)
        run.add_done_callback(done)

    async def _subflow(self, number: int) -> dict[str, Any]:
        return await inference_session(self.worker, number)

    def _warn_session(self, why: str) -> None:
        level = logging.DEBUG if self._session_warned else logging.WARNING
        self._session_warned = True
        log.log(level, "worker %s: Prefect record unavailable (%s): the work goes on without it", self.worker, why)

    # --- reports ----------------------------------------------------------------------------

    async def report(self, worker: str, rows: list[dict[str, Any]], totals: dict[str, Any], final: bool) -> None:
        """A table artifact every ``report_every_s`` while running and one at the end; never blocks the work."""
        if final:
            if self._reporting is not None:
                self._reporting.cancel()
            await self._publish(worker, rows, totals, final)
            return
        now = time.monotonic()
        if now - self._last_report < self.report_every_s or self._reporting is not None:
            return
        self._last_report = now
        self._reporting = asyncio.create_task(self._publish(worker, rows, totals, final))
        self._reporting.add_done_callback(lambda _: setattr(self, "_reporting", None))

    async def _publish(self, worker: str, rows: list[dict[str, Any]], totals: dict[str, Any], final: bool) -> None:
        try:
            await asyncio.wait_for(publish_job_table(worker, rows, totals, final), REPORT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a lost report is a log line, not a stopped worker
            log.warning("worker %s: job table not published (%r); the next one will be", worker, exc)

    async def close(self) -> None:
        await self.queue.close()
        if self._late:  # session records still closing: a few seconds, then they are dropped
            await asyncio.wait(set(self._late), timeout=REPORT_TIMEOUT_S)
            for run in list(self._late):
                run.cancel()
            await asyncio.sleep(0)
        if self._unclosed:
            await self._close_records()
        QUEUES.pop(self.worker, None)

    async def _close_records(self) -> None:
        """Session runs whose end the API missed (it was down) would show Running forever: close them now."""
        from prefect.client.orchestration import get_client
        from prefect.states import Completed

        try:
            async with get_client() as client:
                for run_id in self._unclosed:
                    await asyncio.wait_for(client.set_flow_run_state(
                        run_id, Completed(message="session ended while the Prefect API was unreachable"), force=True),
                        REPORT_TIMEOUT_S)
            log.info("worker %s: closed %d session records the API missed", self.worker, len(self._unclosed))
        except Exception as exc:  # noqa: BLE001
            log.warning("worker %s: %d session records left open (%r)", self.worker, len(self._unclosed), exc)
        self._unclosed.clear()


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
    orchestrator = PrefectOrchestrator(settings, window_s=window_s or WINDOW_S)
    worker = FairWorker(settings, model, orchestrator)
    loop = asyncio.get_running_loop()
    _STOPPERS[settings.worker_name] = (loop, worker.stop)
    take_over_sigterm()
    logger.info("worker %s starting (model %s, pipelines %s)", settings.worker_name, model.kind, sorted(worker.served))
    try:
        with graceful_sigterm():
            totals = await worker.run()
    finally:
        _STOPPERS.pop(settings.worker_name, None)
        await orchestrator.close()
    logger.info("worker %s stopped (%s): %s", settings.worker_name, worker.stop_reason, totals)
    run_context = FlowRunContext.get()
    flow_run = run_context.flow_run if run_context else None
    if worker.stop_reason.startswith("SIGTERM") and flow_run is not None and await _cancel_requested(flow_run.id):
        return Cancelled(message=f"cancelled: batch in flight posted, the rest released; {totals}", data=totals)
    if rollover and worker.stop_reason.startswith("max_runtime_s") and flow_run is not None and flow_run.deployment_id:
        await _roll_over(flow_run, logger)
    return totals


async def _roll_over(flow_run: Any, logger: Any) -> None:
    """``max_runtime_s`` reached: start the next run of this deployment with the same parameters.

    Not for a fleet slot's run (tag ``fleet``): the fleet keeper starts the next one when this
    one Completes (flows/fleet.py), and two would compete for the slot.
    """
    from prefect.deployments import run_deployment

    if "fleet" in (flow_run.tags or []):
        logger.info("rollover: the fleet keeper starts this slot's next run")
        return
    try:
        nxt = await run_deployment(flow_run.deployment_id, parameters=dict(flow_run.parameters), timeout=0,
                                   as_subflow=False, tags=list(flow_run.tags or []),
                                   work_queue_name=flow_run.work_queue_name, flow_run_name=flow_run.name)
        logger.info("rolled over: next run %s (%s) takes over", nxt.name, nxt.id)
    except Exception as exc:  # noqa: BLE001
        logger.error("rollover failed: could not start the next run: %r", exc)
