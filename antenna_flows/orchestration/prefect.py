"""The orchestrator under Prefect: windows of units as task runs, sessions as subflow runs, reports as artifacts.

    fair-worker flow run
    ├── serve-window task run       every reservation round and result post for up to window_s
    ├── inference-session subflow   a stretch of continuous GPU work (at most session_max_s)
    └── worker-<name>-jobs          the per-job table artifact, every few minutes and at the end

The Prefect objects it runs are given to it (``flows/worker.py`` builds it): ``serve_window``
(the task), ``session_flow`` (the subflow) and ``publish_table`` (the artifact writer); here is only
what to do with them, so this module stays free of decorators and importable once by name. A
subflow's parameters are recorded by the Prefect API, so it receives names, not live objects: the
session body waits in :data:`SESSIONS`, the units in
:data:`~antenna_flows.orchestration.windows.WINDOWS`.

Prefect is not the data plane: when its API cannot be reached, units of work run plainly (one
warning line), sessions run without a subflow run, reports are dropped with a log line; the record
resumes when the API answers, and session runs the outage left Running are closed at the end.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any, Awaitable, Callable

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal

from antenna_flows.orchestration.retry import RESERVE_RETRIES, RESERVE_RETRY_DELAY_S, backoff_delays
from antenna_flows.orchestration.windows import WINDOW_S, WINDOWS, Windows, jobs_of_label
from antenna_flows.settings import WorkerSettings

log = logging.getLogger(__name__)

REPORT_EVERY_S = 300.0  # a running worker's table artifact at most this often (final: always): its rows grow with jobs seen
REPORT_TIMEOUT_S = 10.0  # an artifact write waits no longer (the API may be down)
SESSION_START_GRACE_S = 2.0  # a session subflow not started by then runs without its record
FIRST_SESSION_GRACE_S = 15.0  # the first opens before any work waits on it (start-up, often CPU-bound)
SESSION_END_GRACE_S = 1.0  # the work of a session is done: wait no longer for its record to close
PLAIN_SESSIONS_FOR_S = 60.0  # after one could not start: sessions run plainly this long, then try again
ServeWindow = Callable[[str, int, float], Awaitable[Any]]  # (worker, window number, seconds)
SessionFlow = Callable[[str, int], Awaitable[dict[str, Any]]]  # (worker, session number)
PublishTable = Callable[[str, list[dict[str, Any]], dict[str, Any], bool], Awaitable[None]]  # (worker, rows, totals, final)

# The session body each worker of this process is waiting to run, by worker name.
SESSIONS: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}


async def run_session(worker: str) -> dict[str, Any]:
    """The body of ``worker``'s current session (what the inference-session subflow runs)."""
    return await SESSIONS[worker]()


class PrefectOrchestrator:
    """Windows of units as task runs, sessions as subflow runs, reports as table artifacts.

    Construct it inside the worker's flow run: windows are recorded as its task runs.
    """

    name = "prefect"

    def __init__(self, settings: WorkerSettings, *, serve_window: ServeWindow, session_flow: SessionFlow,
                 publish_table: PublishTable, window_s: float = WINDOW_S, report_every_s: float = REPORT_EVERY_S):
        self.worker = settings.worker_name
        self.settings = settings
        self.serve_window = serve_window
        self.session_flow = session_flow
        self.publish_table = publish_table
        self.report_every_s = report_every_s
        self.windows = Windows(self.worker, window_s=window_s, open_window=self._open_window,
                               context=contextvars.copy_context())
        WINDOWS[self.worker] = self.windows
        self._last_report = 0.0
        self._reporting: asyncio.Task[None] | None = None
        self._late: set[asyncio.Task[Any]] = set()
        self._session_warned = False
        self._plain_sessions_until = 0.0
        self._unclosed: list[Any] = []  # session runs left Running by an API outage

    async def _open_window(self, number: int) -> Any:
        return await self.serve_window(self.worker, number, self.windows.window_s)

    # --- units of work ---------------------------------------------------------------------

    async def reserve(self, fn: Callable[[dict[int, int]], Awaitable[int]], wants: dict[int, int]) -> int:
        label = "reserve " + ", ".join(f"job {j} x{n}" for j, n in wants.items())
        return await self.windows.submit("reserve", lambda: fn(wants), backoff_delays(RESERVE_RETRIES, RESERVE_RETRY_DELAY_S),
                                         label, dict(wants))

    async def post(self, fn: Callable[[], Awaitable[None]], label: str, counts: dict[int, int] | None = None) -> None:
        delays = backoff_delays(self.settings.post_retries, self.settings.post_retry_delay_s)
        await self.windows.submit("post", fn, delays, label, dict(counts) if counts else jobs_of_label(label))

    # --- sessions --------------------------------------------------------------------------

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

        SESSIONS[self.worker] = body
        run = asyncio.create_task(self.session_flow(self.worker, number), name=f"{self.worker}-session-{number}")
        waiter = asyncio.create_task(started.wait())
        grace = FIRST_SESSION_GRACE_S if number == 1 else SESSION_START_GRACE_S
        await asyncio.wait({run, waiter}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if "subflow" in claim:
            return await self._finish_session(run, claim, finished, number)
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

    async def _finish_session(self, run: asyncio.Task[Any], claim: dict[str, Any], finished: asyncio.Event,
                              number: int) -> dict[str, Any]:
        """The subflow took the session: wait for its work, then (briefly) for its record to close."""
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
            await asyncio.wait_for(self.publish_table(worker, rows, totals, final), REPORT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a lost report is a log line, not a stopped worker
            log.warning("worker %s: job table not published (%r); the next one will be", worker, exc)

    # --- the end ----------------------------------------------------------------------------

    async def close(self) -> None:
        await self.windows.close()
        if self._late:  # session records still closing: a few seconds, then they are dropped
            await asyncio.wait(set(self._late), timeout=REPORT_TIMEOUT_S)
            for run in list(self._late):
                run.cancel()
            await asyncio.sleep(0)
        if self._unclosed:
            await self._close_records()
        WINDOWS.pop(self.worker, None)
        SESSIONS.pop(self.worker, None)

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
