"""The fair worker: one per GPU, interleaving every job it can see.

Five cooperating loops on one event loop, the GPU on a thread of its own, all
sharing one :class:`~antenna_flows.worker.held.TaskStore`:

- :mod:`.discovery` lists incomplete jobs (``GET /jobs/``; at once when
  JetStream announces a new ``job_*`` stream) and keeps the scheduler's set of
  jobs current;
- :mod:`.reserver` asks the fair scheduler which jobs the next batch should
  come from and reserves just those tasks, never more than the slot starts
  within ``reserve_fraction * ack_wait``; downloads start at once;
- :mod:`.slot` takes the next batch in fair order (one pipeline, any number of
  jobs), runs it on the inference thread and charges each job its measured
  share of the slot seconds;
- :mod:`.poster` posts each batch's answers per job and settles the tasks;
- :mod:`.heartbeat` sends +WPI for every held task: a reservation never
  expires under us.

How a task ends is decided in one place, :mod:`.settle`. Time comes from one
injected clock (``clock``, monotonic seconds), so the pure parts run on a fake.

The slot and poster run inside *inference sessions* (a Prefect subflow run
each under Prefect), which start when something is reserved and end when the
slot has been idle ``session_idle_s`` or after ``session_max_s``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Coroutine

from antenna_flows.accounting import BatchLog, Ledger
from antenna_flows.antenna_client import AntennaClient
from antenna_flows.imageloader import ImageLoader
from antenna_flows.models.base import ImageInput, Model, UnknownPipeline
from antenna_flows.orchestration import Orchestrator, PlainOrchestrator
from antenna_flows.scheduler import CostModel, FairScheduler
from antenna_flows.schemas import PipelineProcessingTask
from antenna_flows.settings import WorkerSettings
from antenna_flows.transport import NatsTransport, RestTransport, Transport
from antenna_flows.worker import discovery, heartbeat, reserver, slot
from antenna_flows.worker.base import TICK_S, FatalWorkerError, JobInfo, wait_for
from antenna_flows.worker.held import WAITING, State, TaskStore
from antenna_flows.worker.settle import Settler

log = logging.getLogger(__name__)

HANDOVER_DRAIN_S = 10.0  # at max_runtime_s, at most this long to run what is reserved before stopping
REPORT_INTERVAL_S = 30.0  # the per-job table; under Prefect published at most every flows.worker.REPORT_EVERY_S


class FairWorker:
    def __init__(
        self,
        settings: WorkerSettings,
        model: Model,
        orchestrator: Orchestrator | None = None,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.name = settings.worker_name
        self.model = model
        self.orch = orchestrator or PlainOrchestrator(post_retries=settings.post_retries,
                                                      post_retry_delay_s=settings.post_retry_delay_s)
        self.transport = transport
        self.clock = clock
        self.served = set(settings.pipelines or model.pipelines())
        self.scheduler = FairScheduler(clock=clock)
        self.cost = CostModel(default_s=settings.initial_seconds_per_image)
        for pipeline in self.served:
            prior = model.expected_seconds_per_image(pipeline, settings.max_batch_size)
            if prior is not None:
                self.cost.seed(pipeline, prior)
        self.ledger = Ledger(worker=self.name, clock=clock)
        self.store = TaskStore()
        self.settler: Settler | None = None
        self.jobs: dict[int, JobInfo] = {}
        self.client: AntennaClient | None = None
        self.loader: ImageLoader | None = None
        # One thread per inference slot: ``slots`` batches in flight on one GPU.
        self.inference = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slot{i}-{self.name}")
                          for i in range(settings.slots)]
        self.running: dict[int, slot.RunningBatch] = {}  # by slot
        self.stopping = asyncio.Event()
        self.wake_reserver = asyncio.Event()
        self.pool_changed = asyncio.Event()
        self.discover_now = asyncio.Event()
        self.loaded: set[str] = set()
        self.warned_pipelines: set[str] = set()
        self.metrics = BatchLog(settings.metrics_file, self.name)
        self.sessions = 0
        self.stop_reason = ""
        self.draining = False  # rolling over: reserve nothing more
        self._fatal: BaseException | None = None
        self._ready_parts: set[str] = set()
        self._last_report = clock()
        self._reporting: asyncio.Task[None] | None = None
        self._spawned: set[asyncio.Task[Any]] = set()  # one-off work (a re-post, a termination), awaited at stop

    # --- lifecycle ------------------------------------------------------------------

    def stop(self, reason: str = "requested") -> None:
        if not self.stopping.is_set():
            log.info("worker %s: stopping (%s): finishing the batch in flight, releasing the rest", self.name, reason)
            self.stop_reason = reason
            self.stopping.set()
            self.pool_changed.set()
            self.wake_reserver.set()

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run one-off work beside the loops; ``run`` waits for it before closing the clients."""
        task = asyncio.create_task(work, name=name)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    def fail(self, exc: BaseException) -> None:
        """Stop because the worker cannot go on; ``run`` raises ``exc`` once everything is handed back."""
        if self._fatal is None:
            self._fatal = exc
            log.error("worker %s: fatal: %s", self.name, exc)
        self.stop(f"fatal: {exc}")

    def token_rejected(self, exc: BaseException) -> None:
        self.fail(FatalWorkerError(f"Antenna rejected the worker's token: {exc}"))

    async def run(self) -> dict[str, Any]:
        """Serve until stopped (signal, ``max_runtime_s``, done, or a fatal error); returns the totals."""
        s = self.settings
        self.client = AntennaClient(s.antenna_api_url, s.antenna_api_token, timeout_s=s.http_timeout_s, worker_name=self.name)
        self.loader = ImageLoader.from_settings(s)
        background: list[asyncio.Task[Any]] = []
        try:
            if self.transport is None:
                if s.transport == "rest":
                    self.transport = RestTransport(self.client, s.rest_ack_wait_s)
                else:
                    self.transport = await NatsTransport.connect(s.nats_url, name=f"antenna-flows-worker {self.name}")
            self.settler = Settler(self.name, self.store, self.ledger, self.transport, s.release_delay_s)
            self.settler.on_settled = self.pool_changed.set
            self._install_signal_handlers()
            await self._prepare_models()
            background = [
                asyncio.create_task(discovery.loop(self), name="discovery"),
                asyncio.create_task(reserver.loop(self), name="reserver"),
                asyncio.create_task(heartbeat.loop(self), name="heartbeat"),
            ]
            if s.max_runtime_s:
                background.append(asyncio.create_task(self._stop_after(s.max_runtime_s), name="max-runtime"))
            await self.transport.watch_new_jobs(discovery.on_new_stream(self))
            log.info(
                "worker %s: serving pipelines %s with model %s via %s (%s orchestration)%s",
                self.name, sorted(self.served), self.model.kind, self.transport.name, self.orch.name,
                f", jobs {s.job_ids} only" if s.job_ids else "",
            )
            while not self.stopping.is_set():
                if self.sessions:  # the first session opens at once, so its start-up is not paid by a job
                    await self._wait_for_work()
                if self.stopping.is_set():
                    break
                self.sessions += 1
                summary = await self.orch.session(lambda: slot.session(self), self.sessions)
                log.info("worker %s: session %d ended: %s", self.name, self.sessions, summary)
                await self.report(final=False)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await asyncio.gather(*self._spawned, return_exceptions=True)  # before the client closes
            if self._reporting is not None:
                await asyncio.gather(self._reporting, return_exceptions=True)
            if self.settler is not None:
                await self.settler.settle(self.store.all(*WAITING), State.RELEASED, "worker stopping")
            await self.report(final=True)
            await self._close()
        if self._fatal is not None:
            raise self._fatal
        return self.ledger.totals()

    async def _prepare_models(self) -> None:
        """Load every served pipeline and time one warm-up image, before taking any task.

        A pipeline whose weights are missing is not served (its tasks stay queued for
        workers that have them) unless it was asked for by name, which is an error. The
        warm-up seeds the seconds-per-image estimate that sizes the first reservations
        (a model with a calibrated prior skips it).
        """
        loop = asyncio.get_running_loop()
        explicit = set(self.settings.pipelines)
        for pipeline in sorted(self.served):
            try:
                await loop.run_in_executor(self.inference[0], self.model.load, pipeline)
            except (FileNotFoundError, UnknownPipeline) as exc:
                if pipeline in explicit:
                    raise FatalWorkerError(f"pipeline {pipeline} cannot be served: {exc}") from exc
                log.warning("worker %s: not serving %s: %s", self.name, pipeline, str(exc).splitlines()[0])
                self.served.discard(pipeline)
                continue
            self.loaded.add(pipeline)
            if self.model.expected_seconds_per_image(pipeline, self.settings.max_batch_size) is not None:
                continue
            task = PipelineProcessingTask(id="warmup", image_id="warmup", image_url="warmup")
            warmup = ImageInput(task, self.model.warmup_input())
            started = self.clock()
            await loop.run_in_executor(self.inference[0], self.model.predict, pipeline, [warmup])
            seconds = self.clock() - started
            self.cost.seed(pipeline, seconds)
            log.info("worker %s: %s loaded; warm-up image took %.2fs", self.name, pipeline, seconds)
        if not self.served:
            raise FatalWorkerError("no pipeline can be served (see the warnings above)")

    async def _close(self) -> None:
        if self.loader:
            await self.loader.aclose()
        if self.client:
            await self.client.aclose()
        if self.transport:
            await self.transport.close()
        for executor in self.inference:
            executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        self.model.close()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass

    async def _stop_after(self, seconds: float) -> None:
        """Roll over cleanly: stop reserving, run what is already reserved (bounded), then stop.

        The next run then starts from an empty hand: nothing released, so nothing redelivered.
        """
        await asyncio.sleep(seconds)
        self.draining = True
        log.info("worker %s: max_runtime_s=%g reached: reserving nothing more, finishing what is reserved",
                 self.name, seconds)
        deadline = self.clock() + HANDOVER_DRAIN_S
        while self.store.waiting_counts() and self.clock() < deadline and not self.stopping.is_set():
            await wait_for(self.pool_changed, TICK_S)
        self.stop(f"max_runtime_s={seconds:g} reached")

    async def _wait_for_work(self) -> None:
        """Sessions start when there is something reserved to run, not merely jobs to look at."""
        while not self.stopping.is_set() and not self.store.waiting_counts():
            await wait_for(self.pool_changed, TICK_S)

    def ready(self, part: str) -> None:
        """Ready (the bench's time zero) once jobs are being polled and a session is open."""
        self._ready_parts.add(part)
        if self._ready_parts >= {"discovery", "session"} and self.settings.ready_file:
            path = Path(self.settings.ready_file)
            if not path.exists():
                path.touch()
                log.info("worker %s: ready", self.name)

    # --- shared estimates -------------------------------------------------------------

    def per_image_s(self) -> float:
        """Seconds between image starts: the slowest served pipeline's cost, spread over the slots."""
        pipelines = {info.pipeline for info in self.jobs.values()} or {""}
        return max(self.cost.per_image(p) for p in pipelines) / self.settings.slots

    def ack_wait_s(self, job_id: int | None = None) -> float:
        info = self.jobs.get(job_id) if job_id is not None else None
        if info is not None:
            return info.ack_wait_s
        return min((i.ack_wait_s for i in self.jobs.values()), default=300.0)

    # --- reporting --------------------------------------------------------------------

    def maybe_report(self) -> None:
        """Every REPORT_INTERVAL_S, off the slot's path: a busy Prefect API must not idle the GPU."""
        if self.clock() - self._last_report > REPORT_INTERVAL_S and self._reporting is None:
            self._reporting = asyncio.create_task(self.report(final=False))
            self._reporting.add_done_callback(lambda _: setattr(self, "_reporting", None))

    async def report(self, final: bool) -> None:
        self._last_report = self.clock()
        try:
            await self.orch.report(self.name, self.ledger.rows(), self.ledger.totals(), final)
        except Exception as exc:  # noqa: BLE001 - reporting never stops work
            log.warning("worker %s: report failed: %s", self.name, exc)
