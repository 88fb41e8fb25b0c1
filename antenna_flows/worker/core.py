"""The fair worker: one per GPU, interleaving every job it can see.

Parts, each built complete (its inputs given at construction, nothing filled in
later) and each a module of its own, all sharing one
:class:`~antenna_flows.worker.held.TaskStore`:

- :mod:`.discovery` keeps the :mod:`.rotation` (the jobs served) current from
  Antenna's job list (at once when JetStream announces a new ``job_*`` stream);
- :mod:`.reserver` asks the fair scheduler which jobs the next batch should come
  from and reserves just those tasks, never more than the slots start within
  ``reserve_fraction * ack_wait``; :mod:`.intake` takes each reserved task in
  (downloads start at once);
- :mod:`.inference` runs batches in fair order on the inference slots, inside
  inference sessions (a Prefect subflow run each under Prefect);
- :mod:`.poster` posts each batch's answers per job;
- :mod:`.keepalive` sends +WPI for every held task: a reservation never expires
  under us.

How a task ends is decided in one place, :mod:`.settle`. Time comes from one
injected clock (``clock``, monotonic seconds), so the pure parts run on a fake.

The worker watches its parts (as Temporal's worker does): a part that dies of an
unexpected exception stops the worker, which hands everything back and raises
:class:`~antenna_flows.worker.base.PartFailed`, so its supervisor (the fleet
keeper, supervisord, systemd) replaces it. Outages (Antenna or NATS briefly
unreachable) are not failures: the parts ride them out.

The stop order (every stop: a signal, ``max_runtime_s``, done, a fatal error):

1. stop reserving (the reserver and discovery end);
2. hand back every task not started (``nak``: another worker takes it while this
   one finishes; a rollover has already run them);
3. finish the batches in flight (the inference session ends after them);
4. post their answers (the poster drains; one-off re-posts are awaited);
5. the keepalive goes on until the last held task is settled, then ends;
6. anything still held (a part failed mid-way) is released, the final report is
   written, the clients close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Callable, Coroutine

from antenna_flows.accounting import BatchLog, Ledger
from antenna_flows.antenna_client import AntennaClient
from antenna_flows.imageloader import ImageLoader
from antenna_flows.models.base import ImageInput, Model, UnknownPipeline
from antenna_flows.orchestration import Orchestrator, PlainOrchestrator
from antenna_flows.fleet_share import FleetShare
from antenna_flows.pacing import SavePacer
from antenna_flows.scheduler import CostModel, FairScheduler
from antenna_flows.schemas import PipelineProcessingTask
from antenna_flows.settings import WorkerSettings
from antenna_flows.transport import NatsTransport, RestTransport, Transport
from antenna_flows.worker.base import TICK_S, FatalWorkerError, PartFailed, Pulse, wait_for
from antenna_flows.worker.discovery import Discovery, DiscoveryPolicy
from antenna_flows.worker.held import State, TaskStore
from antenna_flows.worker.inference import Inference, InferencePolicy
from antenna_flows.worker.intake import Intake
from antenna_flows.worker.keepalive import Keepalive
from antenna_flows.worker.poster import Poster, PostPolicy
from antenna_flows.worker.watch import SaveWatch
from antenna_flows.worker.reserver import Reserver, ReservePolicy
from antenna_flows.worker.rotation import Rotation
from antenna_flows.worker.settle import Settler

log = logging.getLogger(__name__)

HANDOVER_DRAIN_S = 10.0  # at max_runtime_s, at most this long to run what is reserved before stopping
REPORT_INTERVAL_S = 30.0  # the per-job table; under Prefect published at most every flows.worker.REPORT_EVERY_S
SETTLE_TIMEOUT_S = 60.0  # at stop, longest wait for posts to settle before what is left is released
RESERVE_GRACE_S = 5.0  # at stop, a reservation round in flight may finish (what it gets is handed back)


class Parts:
    """The worker's parts, built together once the clients are connected (nothing None after this)."""

    def __init__(self, w: "FairWorker", client: AntennaClient, transport: Transport, loader: ImageLoader):
        s = w.settings
        self.client, self.transport, self.loader = client, transport, loader
        self.share = FleetShare(w.clock)
        self.pacer = SavePacer(backlog_s=s.save_backlog_s, clock=w.clock) if s.pace_to_saves else None
        pacer = self.pacer
        if pacer is not None:
            pacer.unseen = self.share.unseen
            pacer.readings_expected = True  # NATS: the consumers; REST: the job list's progress
            if not transport.can_extend:  # REST: no +WPI, so reservation to saved must fit in ack_wait
                pacer.max_latency_s = 0.5 * s.rest_ack_wait_s
        self.settler = Settler(w.name, w.store, w.ledger, transport, s.release_delay_s, on_fatal=w.fail,
                               on_answered=(lambda held: pacer.answered_one(w.clock() - held.r.reserved_at))
                               if pacer is not None else (lambda held: None))
        self.poster = Poster(w.name, client, w.orch, self.settler, w.store, w.ledger,
                             PostPolicy(s.antenna_api_batch_size, s.post_max_delay_s,
                                        max(32, 4 * s.max_batch_size)), w.pulse, clock=w.clock,
                             save_delay_s=pacer.post_wait_s if pacer is not None else (lambda: 0.0),
                             may_wait=(lambda job_id: pacer.bound() and not pacer.only_redeliveries(job_id))
                             if pacer is not None else (lambda job_id: False))
        self.inference = Inference(
            w.name, w.model, w.store, w.rotation, w.scheduler, w.ledger, w.metrics,
            InferencePolicy(s.slots, s.max_batch_size, s.batch_fill_wait_s, s.session_idle_s, s.session_max_s),
            w.pulse, hand_over=self.poster.put, after_batch=w.maybe_report)
        rest = not transport.can_extend
        self.discovery = Discovery(
            w.name, client, transport, w.rotation, w.store, self.settler,
            DiscoveryPolicy(w.served, frozenset(s.job_ids), s.exit_when_done, s.discovery_interval_s,
                            s.busy_discovery_interval_s, s.idle_forget_s, progress_polls=rest and pacer is not None),
            w.pulse, on_polled=lambda: w.ready("discovery"), on_done=w.stop, on_fatal=w.fail,
            fleet_size=lambda: 1.0 / self.reserver.fleet_share(), pacer=pacer)
        self.intake = Intake(
            w.name, w.store, w.ledger, w.scheduler, loader, w.model, self.settler, repost=self.poster.repost,
            spawn=w.spawn, clock=w.clock, can_hold=transport.can_extend and pacer is not None,
            saves_lag=(lambda: pacer.save_delay_s() >= 0.25 * w.rotation.ack_wait_s()) if pacer else (lambda: False),
            on_lag=pacer.lag_seen if pacer else (lambda: None))
        self.reserver = Reserver(
            w.name, transport, w.store, w.rotation, w.scheduler, self.intake, w.orch,
            ReservePolicy(s.prefetch_batches, s.max_batch_size, s.reserve_fraction, s.prefetch_lead_s, s.slots,
                          api_batch_size=s.antenna_api_batch_size, min_chunk=s.min_reserve_chunk,
                          costly_requests=rest),
            w.pulse, busy_for_s=self.inference.busy_for_s, holding_only=lambda: w.draining,
            on_stream_gone=self.discovery.forget, on_fatal=w.fail, pacer=pacer, share=self.share)
        self.keepalive = Keepalive(transport, w.store, w.rotation, s.in_progress_fraction, w.clock)
        self.watch = SaveWatch(w.name, transport, w.rotation, w.store, self.settler, pacer or SavePacer(clock=w.clock),
                               w.pulse, s.watch_interval_s, answer_again=self.intake.answer_again, share=self.share,
                               on_gone=self.discovery.forget, served=w.served)


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
        self.given_transport = transport
        self.clock = clock
        self.served = set(settings.pipelines or model.pipelines())
        self.pulse = Pulse()
        self.scheduler = FairScheduler(clock=clock)
        self.cost = CostModel(default_s=settings.initial_seconds_per_image)
        for pipeline in self.served:
            prior = model.expected_seconds_per_image(pipeline, settings.max_batch_size)
            if prior is not None:
                self.cost.seed(pipeline, prior)
        self.ledger = Ledger(worker=self.name, clock=clock)
        self.store = TaskStore(on_change=self.pulse.tasks.set)
        self.rotation = Rotation(self.scheduler, self.ledger, self.cost, slots=settings.slots,
                                 reserve_fraction=settings.reserve_fraction, max_batch_size=settings.max_batch_size,
                                 clock=clock)
        self.metrics = BatchLog(settings.metrics_file, self.name)
        self.parts: Parts | None = None  # while running
        self.stop_reason = ""
        self.draining = False  # rolling over: reserve nothing more
        self._fatal: BaseException | None = None
        self._ready_parts: set[str] = set()
        self._last_report = clock()
        self._reporting: asyncio.Task[None] | None = None
        self._spawned: set[asyncio.Task[Any]] = set()  # one-off work (a re-post, a termination), awaited at stop
        self._running: dict[str, asyncio.Task[Any]] = {}  # the parts, by name, while they run

    # --- lifecycle ------------------------------------------------------------------

    @property
    def stopping(self) -> asyncio.Event:
        return self.pulse.stopping

    def stop(self, reason: str = "requested") -> None:
        if not self.pulse.stopping.is_set():
            log.info("worker %s: stopping (%s): handing back what has not started, finishing the batch in flight",
                     self.name, reason)
            self.stop_reason = reason
            self.pulse.stopping.set()
            self.pulse.all_awake()

    def fail(self, exc: BaseException) -> None:
        """Stop because the worker cannot go on; ``run`` raises ``exc`` once everything is handed back."""
        if self._fatal is None:
            self._fatal = exc
            log.error("worker %s: fatal: %s", self.name, exc)
        self.stop(f"fatal: {exc}")

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run one-off work beside the parts; a failure of it fails the worker; ``run`` awaits it at stop."""
        task = asyncio.create_task(work, name=name)
        self._spawned.add(task)
        task.add_done_callback(self._watch(name, discard=self._spawned))

    def _watch(self, part: str, discard: set[asyncio.Task[Any]] | None = None) -> Callable[[asyncio.Task[Any]], None]:
        def done(task: asyncio.Task[Any]) -> None:
            if discard is not None:
                discard.discard(task)
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None and not isinstance(exc, FatalWorkerError):
                log.error("worker %s: part %s failed", self.name, part, exc_info=exc)
                self.fail(PartFailed(part, exc))
            elif exc is not None:
                self.fail(exc)

        return done

    async def run(self) -> dict[str, Any]:
        """Serve until stopped (signal, ``max_runtime_s``, done, or a fatal error); returns the totals."""
        s = self.settings
        async with AsyncExitStack() as resources:
            client = await resources.enter_async_context(
                AntennaClient(s.antenna_api_url, s.antenna_api_token, timeout_s=s.http_timeout_s,
                              worker_name=self.name))
            loader = ImageLoader.from_settings(s)
            resources.push_async_callback(loader.aclose)
            transport = self.given_transport
            if transport is None:
                path, why = s.transport_choice()
                log.info("worker %s: reserving tasks over %s: %s", self.name, path.upper(), why)
                if path == "rest":
                    transport = RestTransport(client, s.rest_ack_wait_s)
                else:
                    assert s.nats_url is not None  # transport_choice says nats only with a URL
                    transport = await NatsTransport.connect(s.nats_url, name=f"antenna-flows-worker {self.name}")
            resources.push_async_callback(transport.close)
            parts = self.parts = Parts(self, client, transport, loader)
            resources.callback(parts.inference.close)
            resources.callback(self.metrics.close)
            resources.callback(self.model.close)
            self._install_signal_handlers()
            try:
                await self._prepare_models(parts.inference)
                await transport.watch_new_jobs(parts.discovery.on_new_stream())
                await self._serve(parts)
            finally:
                await self._stop_in_order(parts)
        if self._fatal is not None:
            raise self._fatal
        return self.ledger.totals()

    async def _serve(self, parts: Parts) -> None:
        s = self.settings
        self._start(parts.discovery.run(), "discovery")
        self._start(parts.reserver.run(), "reserver")
        self._start(parts.keepalive.run(), "keepalive")
        self._start(parts.poster.run(), "poster")
        self._start(parts.watch.run(), "watch")
        self._start(self._hand_back_on_stop(parts), "hand-back")
        if s.max_runtime_s:
            self._start(self._stop_after(s.max_runtime_s), "max-runtime")
        log.info(
            "worker %s: serving pipelines %s with model %s via %s (%s orchestration)%s",
            self.name, sorted(self.served), self.model.kind, parts.transport.name, self.orch.name,
            f", jobs {s.job_ids} only" if s.job_ids else "",
        )
        sessions = 0
        while not self.pulse.stopping.is_set():
            if sessions:  # the first session opens at once, so its start-up is not paid by a job
                await self._wait_for_work()
            if self.pulse.stopping.is_set():
                break
            sessions += 1
            summary = await self.orch.session(lambda: self._session(parts.inference), sessions)
            log.info("worker %s: session %d ended: %s", self.name, sessions, summary)
            await self.report(final=False)

    async def _session(self, inference: Inference) -> dict[str, Any]:
        self.ready("session")
        return await inference.session()

    def _start(self, work: Coroutine[Any, Any, Any], part: str) -> None:
        task = asyncio.create_task(work, name=f"{self.name}-{part}")
        self._running[part] = task
        task.add_done_callback(self._watch(part))

    async def _end(self, *names: str, grace_s: float = 0.0) -> None:
        """End these parts: each gets ``grace_s`` to return by itself (they watch the stop), then is cancelled."""
        tasks = [self._running.pop(n) for n in names if n in self._running]
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _hand_back_on_stop(self, parts: Parts) -> None:
        """Steps 1 and 2, as soon as the stop comes: the session is still finishing its batches."""
        await self.pulse.stopping.wait()
        await self._end("max-runtime")
        await self._end("reserver", "discovery", "watch", grace_s=RESERVE_GRACE_S)
        await parts.settler.release_waiting("worker stopping")

    async def _stop_in_order(self, parts: Parts) -> None:
        """The stop order of the module docstring; never raises (what it cannot do is released)."""
        self.stop(self.stop_reason or "run ended")
        # 1, 2: stop reserving, hand back what has not started (begun at the stop, while 3 went on)
        await self._end("hand-back", grace_s=RESERVE_GRACE_S + 5.0)
        await self._end("reserver", "discovery", "watch", "max-runtime")
        await parts.settler.release_waiting("worker stopping")
        # 3. the batches in flight were finished by the session, which has returned by now
        # 4. post their answers, and any one-off re-post
        await parts.poster.close()
        deadline = self.clock() + SETTLE_TIMEOUT_S
        await self._end("poster", grace_s=SETTLE_TIMEOUT_S)
        while self._spawned and self.clock() < deadline:
            await asyncio.wait(set(self._spawned), timeout=max(0.0, deadline - self.clock()))
        # 5. the keepalive kept every held task alive until here
        await self._end("keepalive")
        # 6. whatever is still held (a part failed mid-way) goes back to the queue
        left = list(self.store.all())
        if left:
            log.warning("worker %s: releasing %d tasks still held at stop", self.name, len(left))
            await parts.settler.settle(left, State.RELEASED, "worker stopping with the task unposted")
        if self._reporting is not None:
            await asyncio.gather(self._reporting, return_exceptions=True)
        await self.report(final=True)

    async def _prepare_models(self, inference: Inference) -> None:
        """Load every served pipeline and time one warm-up image, before taking any task.

        A pipeline whose weights are missing is not served (its tasks stay queued for
        workers that have them) unless it was asked for by name, which is an error. The
        warm-up seeds the seconds-per-image estimate that sizes the first reservations
        (a model with a calibrated prior skips it).
        """
        explicit = set(self.settings.pipelines)
        for pipeline in sorted(self.served):
            try:
                await inference.load(pipeline)
            except (FileNotFoundError, UnknownPipeline) as exc:
                if pipeline in explicit:
                    raise FatalWorkerError(f"pipeline {pipeline} cannot be served: {exc}") from exc
                log.warning("worker %s: not serving %s: %s", self.name, pipeline, str(exc).splitlines()[0])
                self.served.discard(pipeline)
                continue
            if self.model.expected_seconds_per_image(pipeline, self.settings.max_batch_size) is not None:
                continue
            task = PipelineProcessingTask(id="warmup", image_id="warmup", image_url="warmup")
            seconds = await inference.time_one(pipeline, ImageInput(task, self.model.warmup_input()))
            self.cost.seed(pipeline, seconds)
            log.info("worker %s: %s loaded; warm-up image took %.2fs", self.name, pipeline, seconds)
        if not self.served:
            raise FatalWorkerError("no pipeline can be served (see the warnings above)")

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
        while self.store.waiting_counts() and self.clock() < deadline and not self.pulse.stopping.is_set():
            await wait_for(self.pulse.tasks, TICK_S)
        self.stop(f"max_runtime_s={seconds:g} reached")

    async def _wait_for_work(self) -> None:
        """Sessions start when there is something reserved to run, not merely jobs to look at."""
        while not self.pulse.stopping.is_set() and not self.store.waiting_counts():
            await wait_for(self.pulse.tasks, TICK_S)

    def ready(self, part: str) -> None:
        """Ready (the bench's time zero) once jobs are being polled and a session is open."""
        self._ready_parts.add(part)
        if self._ready_parts >= {"discovery", "session"} and self.settings.ready_file:
            path = Path(self.settings.ready_file)
            if not path.exists():
                path.touch()
                log.info("worker %s: ready", self.name)

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
