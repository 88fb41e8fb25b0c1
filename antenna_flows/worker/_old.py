"""The fair worker: one per GPU, interleaving every job it can see.

Five cooperating loops on one event loop, the GPU on a thread of its own:

- **discovery** lists incomplete jobs (``GET /jobs/``, every second, sooner when
  JetStream announces a new ``job_*`` stream) and keeps the scheduler's set of
  jobs current;
- **reserver** asks the fair scheduler which jobs the next batch should come
  from and reserves just those tasks (``no_wait`` pulls), never more than the
  slot will start within ``reserve_fraction * ack_wait``; downloads start at
  once, so the next batch is decoded while the current one runs;
- **slot** takes the next batch from the reserved pool in fair order (one
  pipeline, any number of jobs), runs it on the inference thread and charges
  each job its measured share of the slot seconds;
- **poster** posts each batch's results per job, acks once Antenna accepts
  them, and hands tasks back (nak with a jittered delay) if it never does;
- **heartbeat** sends +WPI for every task held, reserved or running, every
  ``in_progress_fraction * ack_wait``: a reservation never expires under us.

Discovery, reserver and heartbeat live as long as the worker (the worker
flow run: each reservation round is a task run). The slot and poster run
inside *inference sessions* (a subflow run each), which start when something
is reserved and end when the slot has been idle ``session_idle_s`` or after
``session_max_s``: the Prefect UI shows when the GPU worked and for whom, and
a worker that runs for weeks keeps a bounded run history. Task runs return
only counts, so a long flow run holds no per-call results in memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from antenna_flows.accounting import BatchLog, Ledger
from antenna_flows.antenna_client import AntennaClient, AuthError, Rejected, Unavailable
from antenna_flows.lab.antenna.demo_images import generate_frame
from antenna_flows.imageloader import ImageError, ImageLoader
from antenna_flows.jetstream import Reservation, StreamGone
from antenna_flows.models.base import ImageInput, Model, UnknownPipeline
from antenna_flows.orchestration import Orchestrator, PlainOrchestrator
from antenna_flows.scheduler import CostModel, FairScheduler, reservation_cap
from antenna_flows.schemas import (
    PipelineProcessingTask,
    PipelineResultsError,
    PipelineResultsResponse,
    TaskResult,
)
from antenna_flows.settings import WorkerSettings
from antenna_flows.transport import NatsTransport, RestTransport, Transport

log = logging.getLogger(__name__)

ANSWERED_MEMORY = 100_000  # (job, image) pairs remembered as answered, to skip redeliveries
MAX_PENDING_POSTS = 4  # batches waiting to be posted before the slot waits (backpressure)
POSTERS = 2  # result posts in flight at once (as upstream's two threads)
REPORT_INTERVAL_S = 30.0
RESERVE_TICK_S = 0.25  # re-plan at least this often (dry jobs come back, redeliveries appear)
HEARTBEAT_TICK_S = 0.1  # how often held tasks are checked for a due +WPI
WARMUP_SIZE = (1024, 768)  # the detector resizes to 800-1333 px whatever the input
ADVISORY_FOLLOW_UPS_S = (0.05, 0.2, 0.5)  # polls after a stream-created advisory, until a job joins


class FatalWorkerError(RuntimeError):
    """The worker cannot go on (wrong token): it stops, releasing what it holds."""


@dataclass(eq=False)
class Held:
    """A reserved task and everything the worker attached to it."""

    r: Reservation
    image: asyncio.Task[Any] | None = None
    twins: list[Reservation] = field(default_factory=list)  # later deliveries of the same image

    @property
    def key(self) -> tuple[int, str] | None:
        return (self.r.job_id, self.r.task.image_id) if self.r.task else None

    def reservations(self) -> list[Reservation]:
        return [self.r, *self.twins]

    @property
    def ready(self) -> bool:
        return self.image is None or self.image.done()


@dataclass
class JobInfo:
    job_id: int
    pipeline: str
    priority: int
    ack_wait_s: float
    last_listed: float


@dataclass
class BatchOutcome:
    pipeline: str
    results: list[tuple[Held, PipelineResultsResponse | PipelineResultsError]]


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
        expected = getattr(model, "expected_seconds_per_image", None)
        if expected is not None:
            for pipeline in self.served:
                self.cost.seed(pipeline, expected(pipeline, settings.max_batch_size))
        self.ledger = Ledger(worker=self.name, clock=clock)
        self.jobs: dict[int, JobInfo] = {}
        self.pool: dict[int, deque[Held]] = {}
        self.running: list[Held] = []  # in the batch on the slot
        self._running_pipeline = ""
        self._running_since = 0.0
        self.posting: dict[int, Held] = {}  # id(held) -> held: results computed, not yet acked
        self.answered: OrderedDict[tuple[int, str], None] = OrderedDict()
        self.client: AntennaClient | None = None
        self.loader: ImageLoader | None = None
        self._slot = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slot-{self.name}")
        self._stop = asyncio.Event()
        self._wake_reserver = asyncio.Event()
        self._pool_changed = asyncio.Event()
        self._discover_now = asyncio.Event()
        self._post_queue: asyncio.Queue[BatchOutcome | None] | None = None
        self._fatal: BaseException | None = None
        self._warned_pipelines: set[str] = set()
        self._loaded: set[str] = set()
        self._prepare = getattr(model, "host_tensor", None)  # model-specific pixel prep, done in loader threads
        self._decode = getattr(model, "decode", None)  # model's fast decoder (bytes -> prepared), tried before PIL
        self._metrics = BatchLog(settings.metrics_file, self.name)
        self._sessions = 0
        self._ready_parts: set[str] = set()
        self._ready_written = False
        self._last_report = time.monotonic()
        self._reporting: asyncio.Task[None] | None = None
        self.stop_reason = ""

    # --- lifecycle ------------------------------------------------------------------

    def stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("worker %s: stopping (%s): finishing the batch in flight, releasing the rest", self.name, reason)
            self.stop_reason = reason
            self._stop.set()
            self._pool_changed.set()
            self._wake_reserver.set()

    async def run(self) -> dict[str, Any]:
        """Serve until stopped (signal, ``max_runtime_s``, or a fatal error); returns the totals."""
        s = self.settings
        self.client = AntennaClient(s.antenna_api_url, s.antenna_api_token, timeout_s=s.http_timeout_s, worker_name=self.name)
        self.loader = ImageLoader(
            timeout_s=s.image_timeout_s, max_bytes=s.image_max_bytes, max_pixels=s.image_max_pixels,
            concurrency=s.download_concurrency,
        )
        background: list[asyncio.Task[Any]] = []
        try:
            if self.transport is None:
                if s.transport == "rest":
                    self.transport = RestTransport(self.client, s.rest_ack_wait_s)
                else:
                    self.transport = await NatsTransport.connect(s.nats_url, name=f"antenna-flows-worker {self.name}")
            self._install_signal_handlers()
            await self._prepare_models()
            background = [
                asyncio.create_task(self._discovery_loop(), name="discovery"),
                asyncio.create_task(self._reserver_loop(), name="reserver"),
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            ]
            if s.max_runtime_s:
                background.append(asyncio.create_task(self._stop_after(s.max_runtime_s), name="max-runtime"))
            await self.transport.watch_new_jobs(self._on_new_stream)
            log.info(
                "worker %s: serving pipelines %s with model %s via %s (%s orchestration)",
                self.name, sorted(self.served), self.model.kind, self.transport.name, self.orch.name,
            )
            while not self._stop.is_set():
                if self._sessions:  # the first session opens at once, so its start-up is not paid by a job
                    await self._wait_for_work()
                if self._stop.is_set():
                    break
                self._sessions += 1
                summary = await self.orch.session(self._session, self._sessions)
                log.info("worker %s: session %d ended: %s", self.name, self._sessions, summary)
                await self._report(final=False)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if self._reporting is not None:
                await asyncio.gather(self._reporting, return_exceptions=True)
            if self.transport is not None:
                await self._release_all("worker stopping")
            await self._report(final=True)
            await self._close()
        if self._fatal is not None:
            raise self._fatal
        return self.ledger.totals()

    async def _prepare_models(self) -> None:
        """Load every served pipeline and time one warm-up image, before taking any task.

        A pipeline whose weights are missing is not served (its tasks stay queued for
        workers that have them) unless it was asked for by name, which is an error. The
        warm-up seeds the seconds-per-image estimate that sizes the first reservations.
        """
        if getattr(self.model, "expected_seconds_per_image", None) is not None:
            return
        loop = asyncio.get_running_loop()
        explicit = set(self.settings.pipelines)
        frame = generate_frame(*WARMUP_SIZE, seed=0)  # a trap-like frame: the classifiers get crops too
        for pipeline in sorted(self.served):
            try:
                await loop.run_in_executor(self._slot, self.model.load, pipeline)
            except (FileNotFoundError, UnknownPipeline) as exc:
                if pipeline in explicit:
                    raise FatalWorkerError(f"pipeline {pipeline} cannot be served: {exc}") from exc
                log.warning("worker %s: not serving %s: %s", self.name, pipeline, str(exc).splitlines()[0])
                self.served.discard(pipeline)
                continue
            self._loaded.add(pipeline)
            task = PipelineProcessingTask(id="warmup", image_id="warmup", image_url="warmup")
            image = self._prepare(frame) if self._prepare else frame
            started = time.perf_counter()
            await loop.run_in_executor(self._slot, self.model.predict, pipeline, [ImageInput(task, image)])
            seconds = time.perf_counter() - started
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
        self._slot.shutdown(wait=False, cancel_futures=True)
        self._metrics.close()
        self.model.close()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass

    async def _stop_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.stop(f"max_runtime_s={seconds:g} reached")

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
            log.error("worker %s: fatal: %s", self.name, exc)
        self.stop(f"fatal: {exc}")

    async def _wait_for_work(self) -> None:
        """Sessions start when there is something reserved to run, not merely jobs to look at."""
        while not self._stop.is_set() and not any(self.pool.values()):
            self._pool_changed.clear()
            try:
                await asyncio.wait_for(self._pool_changed.wait(), timeout=RESERVE_TICK_S)
            except asyncio.TimeoutError:
                pass

    # --- discovery ---------------------------------------------------------------------

    def _ready(self, part: str) -> None:
        """Ready (the bench's time zero) once jobs are being polled and a session is open."""
        self._ready_parts.add(part)
        if self._ready_parts >= {"discovery", "session"} and self.settings.ready_file and not self._ready_written:
            Path(self.settings.ready_file).touch()
            self._ready_written = True
            log.info("worker %s: ready", self.name)

    async def _on_new_stream(self, job_id: int) -> None:
        log.debug("worker %s: stream job_%s created, polling jobs now", self.name, job_id)
        self._discover_now.set()

    async def _discovery_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await self.discover_once()
                failures = 0
                self._ready("discovery")
            except AuthError as exc:
                self._fail(FatalWorkerError(f"Antenna rejected the worker's token: {exc}"))
                return
            except (Unavailable, Rejected) as exc:
                failures += 1
                if failures in (1, 10) or failures % 60 == 0:
                    log.warning("worker %s: job discovery failed (%d in a row): %s; serving known jobs", self.name, failures, exc)
            except Exception:  # noqa: BLE001 - discovery must outlive any one failure
                log.exception("worker %s: job discovery crashed; retrying", self.name)
            self._discover_now.clear()
            try:
                await asyncio.wait_for(self._discover_now.wait(), timeout=self.settings.discovery_interval_s)
            except asyncio.TimeoutError:
                continue
            # A stream was just created: its job is listed once Antenna has published its tasks.
            for delay in ADVISORY_FOLLOW_UPS_S:
                await asyncio.sleep(delay)
                try:
                    if await self.discover_once():
                        break
                except Exception:  # noqa: BLE001 - the regular poll reports failures
                    break

    async def discover_once(self) -> int:
        """One poll of Antenna's incomplete jobs; returns how many joined the rotation."""
        assert self.client is not None and self.transport is not None
        joined = 0
        listed = await self.client.list_jobs(sorted(self.served))
        now = self.clock()
        for item in listed:
            pipeline = item.pipeline_slug
            if pipeline not in self.served:
                if pipeline not in self._warned_pipelines:
                    self._warned_pipelines.add(str(pipeline))
                    log.warning("worker %s: job %s has pipeline %r this worker does not serve: left for others",
                                self.name, item.id, pipeline)
                continue
            info = self.jobs.get(item.id)
            if info is None:
                try:
                    ack_wait = await self.transport.ack_wait(item.id)
                except StreamGone:
                    continue  # listed but no queue yet (CREATED/PENDING), or already gone
                self.jobs[item.id] = JobInfo(item.id, pipeline, item.priority, ack_wait, now)
                self.scheduler.add(item.id, pipeline, item.priority)
                self.ledger.job(item.id, pipeline, item.priority)
                log.info("worker %s: job %s (%s, priority %d, ack_wait %.0fs) joined the rotation",
                         self.name, item.id, pipeline, item.priority, ack_wait)
                self._wake_reserver.set()
                joined += 1
            else:
                info.last_listed = now
                if info.priority != item.priority:
                    info.priority = item.priority
                    self.scheduler.add(item.id, pipeline, item.priority)
        for job_id, info in list(self.jobs.items()):
            if now - info.last_listed > self.settings.idle_forget_s and not self.pool.get(job_id):
                await self._forget(job_id, "no longer listed as incomplete")
        return joined

    async def _forget(self, job_id: int, why: str) -> None:
        self.jobs.pop(job_id, None)
        self.scheduler.remove(job_id)
        dropped = self.pool.pop(job_id, None)
        if dropped:
            self.ledger.count(job_id, "dropped", len(dropped))
            for held in dropped:
                if held.image:
                    held.image.cancel()
            log.warning("worker %s: job %s %s: dropped %d reserved tasks (nothing to ack them to)",
                        self.name, job_id, why, len(dropped))
        else:
            log.info("worker %s: job %s left the rotation (%s)", self.name, job_id, why)
        assert self.transport is not None
        await self.transport.forget(job_id)

    # --- reservation -------------------------------------------------------------------

    def _pool_counts(self) -> dict[int, int]:
        return {j: len(q) for j, q in self.pool.items() if q}

    def _ready_counts(self) -> dict[int, int]:
        """Reserved tasks whose image is loaded (or that need none): what a batch can take now.

        Batches are formed from these only, so a newcomer's downloads never stall
        the GPU: it runs what is ready, and the newcomer joins the next batch.
        """
        counts = {j: sum(1 for h in q if h.ready) for j, q in self.pool.items()}
        return {j: n for j, n in counts.items() if n}

    def _take_ready(self, job_id: int, n: int) -> list[Held]:
        """The ``n`` oldest ready tasks of a job, out of its pool."""
        queue = self.pool[job_id]
        taken = [h for h in queue if h.ready][:n]
        for held in taken:
            queue.remove(held)
        return taken

    def _per_image_s(self) -> float:
        pipelines = {info.pipeline for info in self.jobs.values()} or {""}
        return max(self.cost.per_image(p) for p in pipelines)

    def _ack_wait_s(self) -> float:
        return min((info.ack_wait_s for info in self.jobs.values()), default=300.0)

    def _urgent(self) -> dict[int, int]:
        """Reserved tasks that would overstay the reservation window if they waited two more batches.

        Tasks a newcomer displaced in fair order would otherwise age in the pool; these
        go first, so no reservation sits idle past ``reserve_fraction * ack_wait``.
        """
        window = self._ack_wait_s() * self.settings.reserve_fraction
        urgent_age = window - 2 * self._per_image_s() * self.settings.max_batch_size
        now = self.clock()
        out = {}
        for job_id, queue in self.pool.items():
            n = 0
            for held in queue:  # oldest first
                if now - held.r.reserved_at < urgent_age:
                    break
                n += held.ready
            if n:
                out[job_id] = n
        return out

    def batch_limit(self) -> int:
        """Largest batch whose images all start within the reservation window."""
        cap = reservation_cap(self._ack_wait_s(), self.settings.reserve_fraction, self._per_image_s())
        return max(1, min(self.settings.max_batch_size, cap))

    def _busy_for_s(self) -> float:
        """How long the slot is still expected to be busy with the batch it runs."""
        if not self.running:
            return 0.0
        expected = len(self.running) * self.cost.per_image(self._running_pipeline)
        return max(0.0, expected - (self.clock() - self._running_since))

    async def _reserver_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_reserver.clear()
            try:
                await self._reserve_round()
            except AuthError as exc:
                self._fail(FatalWorkerError(str(exc)))
                return
            except Exception as exc:  # noqa: BLE001 - NATS hiccups: retried next tick
                log.warning("worker %s: reservation failed: %s", self.name, exc)
            try:
                await asyncio.wait_for(self._wake_reserver.wait(), timeout=RESERVE_TICK_S)
            except asyncio.TimeoutError:
                pass

    async def _reserve_round(self) -> None:
        """Top the pool up to the next batch (within the cap), re-planning when a job comes up short."""
        for _ in range(len(self.jobs) + 1):
            if self._stop.is_set():
                return
            pool = self._pool_counts()
            busy_for = self._busy_for_s()
            cap = reservation_cap(self._ack_wait_s(), self.settings.reserve_fraction, self._per_image_s(), busy_for)
            target = min(self.settings.prefetch_batches * self.settings.max_batch_size, cap)
            if target < 1:
                # The window cannot hold a prefetched image (slow model, short ack_wait): take the
                # next one only when the slot is about to free, early enough to download it.
                if pool or busy_for > self.settings.prefetch_lead_s:
                    return
                target = cap = 1
            wants = self.scheduler.plan_reservations(pool, target, self.cost.per_image)
            # Tasks a newcomer displaces in fair order wait one batch more: where the window holds
            # two batches, allow one batch over the cap for them (urgency bounds their wait).
            slack = target if cap >= 2 * target else 0
            wants = _trim(wants, cap + slack - sum(pool.values()))
            if not wants:
                return
            if all(self.scheduler.dry_for(j) > 0 for j in wants):
                # Only probing jobs that had nothing last time: not worth a task run of its own.
                got = await self._reserve(wants)
            else:
                got = await self.orch.reserve(self._reserve, wants)
            if got >= sum(wants.values()):
                return

    async def _reserve(self, wants: dict[int, int]) -> int:
        """One reservation round (a Prefect task run): reserve ``wants[job]`` from each job."""
        assert self.transport is not None
        got_total = 0
        for job_id, n in wants.items():
            if job_id not in self.jobs:
                continue
            try:
                got = await self.transport.reserve(job_id, n)
            except StreamGone:
                await self._forget(job_id, "stream vanished (completed or cancelled)")
                continue
            self._accept(job_id, got)
            got_total += len(got)
            if len(got) < n:
                self.scheduler.mark_dry(job_id)
        return got_total

    def _accept(self, job_id: int, reservations: list[Reservation]) -> None:
        if not reservations:
            return
        self.scheduler.mark_wet(job_id)
        queue = self.pool.setdefault(job_id, deque())
        redelivered = 0
        for r in reservations:
            if r.num_delivered > 1:
                redelivered += 1
            held = Held(r)
            key = held.key
            if key is not None and key in self.answered:
                # Redelivery of an image we already answered (our ack came late): ack, don't redo.
                self.ledger.count(job_id, "duplicates_skipped")
                log.info("worker %s: job %s image %s redelivered (delivery %d) after we answered it: acked, not reprocessed",
                         self.name, job_id, key[1], r.num_delivered)
                asyncio.create_task(self.transport.ack(r))  # type: ignore[union-attr]
                continue
            twin = self._find_held(key) if key is not None else None
            if twin is not None:
                twin.twins.append(r)  # same image already with us: answer both deliveries together
                log.info("worker %s: job %s image %s delivered again (delivery %d) while we hold it",
                         self.name, job_id, key[1] if key else "?", r.num_delivered)
                continue
            if r.task is not None:
                held.image = asyncio.create_task(self.loader.load(r.task.image_url, self._prepare, self._decode))  # type: ignore[union-attr]
                held.image.add_done_callback(self._image_done)
            queue.append(held)
        if redelivered:
            log.info("worker %s: job %s: %d of %d reserved tasks were redeliveries", self.name, job_id, redelivered,
                     len(reservations))
        self.ledger.reserved(job_id, len(reservations), redelivered)
        self._pool_changed.set()

    def _image_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here; the batch reads it again and answers with an error result
        self._pool_changed.set()

    def _find_held(self, key: tuple[int, str]) -> Held | None:
        for held in (*self.pool.get(key[0], ()), *self.running, *self.posting.values()):
            if held.key == key:
                return held
        return None

    # --- heartbeat --------------------------------------------------------------------

    def held_reservations(self) -> list[Reservation]:
        out: list[Reservation] = []
        for queue in self.pool.values():
            for held in queue:
                out.extend(held.reservations())
        for held in (*self.running, *self.posting.values()):
            out.extend(held.reservations())
        return out

    async def _heartbeat_loop(self) -> None:
        """+WPI every held task whose window is a third gone (per its job's ack_wait)."""
        assert self.transport is not None
        if not self.transport.can_extend:
            return
        while True:
            await asyncio.sleep(HEARTBEAT_TICK_S)
            now = self.clock()
            for r in self.held_reservations():
                info = self.jobs.get(r.job_id)
                period = (info.ack_wait_s if info else self._ack_wait_s()) * self.settings.in_progress_fraction
                if now - max(r.reserved_at, r.touched_at) >= period:
                    r.touched_at = now
                    await self.transport.in_progress(r)

    # --- inference session ----------------------------------------------------------

    async def _session(self) -> dict[str, Any]:
        """One inference session: run batches and post them until idle, too long, or stopping."""
        started = self.clock()
        before = self.ledger.totals()
        self._ready("session")
        self._post_queue = asyncio.Queue(maxsize=MAX_PENDING_POSTS)
        posters = [asyncio.create_task(self._poster_loop(), name=f"poster-{i}") for i in range(POSTERS)]
        try:
            await self._slot_loop(started + self.settings.session_max_s)
        finally:
            for _ in posters:
                await self._post_queue.put(None)
            await asyncio.gather(*posters, return_exceptions=True)
        after = self.ledger.totals()
        return {
            "session": self._sessions,
            "seconds": round(self.clock() - started, 3),
            "batches": after["batches"] - before["batches"],
            "images": after["images"] - before["images"],
            "errors": after["errors"] - before["errors"],
            "jobs": sorted(self.jobs),
        }

    async def _slot_loop(self, deadline: float) -> None:
        idle_since = self.clock()
        free_since: float | None = None  # when the slot last found too little ready to fill a batch
        while not self._stop.is_set() and self.clock() < deadline:
            ready = self._ready_counts()
            loading = sum(self._pool_counts().values()) - sum(ready.values())
            if ready and loading and sum(ready.values()) < self.batch_limit():
                # Dynamic batching: wait a moment for images still loading rather than run a thin batch.
                free_since = free_since if free_since is not None else self.clock()
                left = self.settings.batch_fill_wait_s - (self.clock() - free_since)
                if left > 0:
                    self._pool_changed.clear()
                    try:
                        await asyncio.wait_for(self._pool_changed.wait(), timeout=left)
                    except asyncio.TimeoutError:
                        pass
                    continue
            free_since = None
            if not ready:
                if not self._pool_counts() and self.clock() - idle_since > self.settings.session_idle_s:
                    return
                self._pool_changed.clear()
                try:  # reserved tasks arrive, or their images finish loading
                    await asyncio.wait_for(self._pool_changed.wait(), timeout=RESERVE_TICK_S)
                except asyncio.TimeoutError:
                    pass
                continue
            pipeline, counts = self.scheduler.select_batch(ready, self.batch_limit(), self.cost.per_image,
                                                           self._urgent())
            if not counts or pipeline is None:
                await asyncio.sleep(0.01)
                continue
            batch = [held for j, n in counts.items() for held in self._take_ready(j, n)]
            outcome = await self._run_batch(pipeline, counts, batch)
            assert self._post_queue is not None
            await self._post_queue.put(outcome)
            if time.monotonic() - self._last_report > REPORT_INTERVAL_S and self._reporting is None:
                # off the slot's path: an artifact write to a busy Prefect API must not idle the GPU
                self._reporting = asyncio.create_task(self._report(final=False))
                self._reporting.add_done_callback(lambda _: setattr(self, "_reporting", None))
            idle_since = self.clock()

    async def _run_batch(self, pipeline: str, counts: dict[int, int], batch: list[Held]) -> BatchOutcome:
        self.running = batch
        self._running_pipeline, self._running_since = pipeline, self.clock()
        self._wake_reserver.set()  # room in the pool: reserve the batch after this one now
        loop = asyncio.get_running_loop()
        results: list[tuple[Held, PipelineResultsResponse | PipelineResultsError]] = []
        ready: list[tuple[Held, ImageInput]] = []
        for held in batch:
            if held.r.task is None:
                log.warning("worker %s: job %s: %s (delivery %d): answering with an error result",
                            self.name, held.r.job_id, held.r.parse_error, held.r.num_delivered)
                results.append((held, PipelineResultsError(error=held.r.parse_error or "malformed task", image_id=None)))
                continue
            try:
                assert held.image is not None
                image = await held.image
            except ImageError as exc:
                log.warning("worker %s: job %s image %s: %s", self.name, held.r.job_id, held.r.task.image_id, exc)
                results.append((held, PipelineResultsError(error=str(exc), image_id=held.r.task.image_id)))
                continue
            except Exception as exc:  # noqa: BLE001
                results.append((held, PipelineResultsError(error=f"image load failed: {exc!r}", image_id=held.r.task.image_id)))
                continue
            finally:
                held.image = None
            ready.append((held, ImageInput(held.r.task, image)))
        if pipeline not in self._loaded:
            try:
                await loop.run_in_executor(self._slot, self.model.load, pipeline)
                self._loaded.add(pipeline)
            except UnknownPipeline:
                ready_err = [(h, PipelineResultsError(error=f"unknown pipeline {pipeline!r}", image_id=i.task.image_id))
                             for h, i in ready]
                results.extend(ready_err)
                ready = []
        ticket = self.scheduler.start_batch(pipeline, counts, self.cost.per_image)
        started = self.clock()
        wall_start = time.time()
        idle = {}
        for held in batch:
            idle[held.r.job_id] = max(idle.get(held.r.job_id, 0.0), started - held.r.reserved_at)
        if ready:
            outputs = await self._predict(pipeline, ready)
            results.extend(zip([h for h, _ in ready], outputs))
        seconds = self.clock() - started
        self.running = []
        shares = self.scheduler.finish_batch(ticket, seconds)
        if ready:
            self.cost.observe(pipeline, len(ready), seconds)
        self.ledger.batch(shares, counts, idle)
        for held, _ in results:
            self.posting[id(held)] = held
        self._metrics.write(pipeline, wall_start, seconds, counts, max(idle.values(), default=0.0))
        return BatchOutcome(pipeline, results)

    async def _predict(self, pipeline: str, ready: list[tuple[Held, ImageInput]]) -> list[PipelineResultsResponse | PipelineResultsError]:
        """Run the batch; if the batch as a whole fails, retry image by image so one bad input fails alone."""
        loop = asyncio.get_running_loop()
        inputs = [i for _, i in ready]
        try:
            return list(await loop.run_in_executor(self._slot, self.model.predict, pipeline, inputs))
        except Exception as exc:  # noqa: BLE001
            log.warning("worker %s: batch of %d (%s) failed: %r; retrying image by image", self.name, len(inputs), pipeline, exc)
        outputs: list[PipelineResultsResponse | PipelineResultsError] = []
        for item in inputs:
            try:
                outputs.extend(await loop.run_in_executor(self._slot, self.model.predict, pipeline, [item]))
            except Exception as exc:  # noqa: BLE001
                outputs.append(PipelineResultsError(error=f"inference failed: {exc!r}", image_id=item.task.image_id))
        return outputs

    # --- posting --------------------------------------------------------------------

    async def _poster_loop(self) -> None:
        assert self._post_queue is not None
        while True:
            outcome = await self._post_queue.get()
            if outcome is None:
                return
            await self._post_batch(outcome)

    async def _post_batch(self, outcome: BatchOutcome) -> None:
        """Post a batch's results, one request per job, as one unit of work (one task run).

        The unit is idempotent (a job answered is not posted again on retry) and
        retries only outages; a refusal or a vanished job is settled per job
        afterwards, each with its deliberate outcome.
        """
        by_job: dict[int, list[tuple[Held, PipelineResultsResponse | PipelineResultsError]]] = {}
        for held, result in outcome.results:
            by_job.setdefault(held.r.job_id, []).append((held, result))
        settled: dict[int, BaseException | None] = {}

        async def post_one(job_id: int) -> None:
            items = by_job[job_id]
            payload = [TaskResult(reply_subject=h.r.reply_subject, result=res) for h, res in items]
            try:
                await self.client.post_results(job_id, payload)  # type: ignore[union-attr]
                settled[job_id] = None
            except (Rejected, AuthError) as exc:  # retrying would not change the answer
                settled[job_id] = exc

        async def post() -> None:
            pending = [j for j in by_job if j not in settled]
            failures = [r for r in await asyncio.gather(*(post_one(j) for j in pending), return_exceptions=True) if r]
            if failures:
                raise failures[0]

        label = "post " + ", ".join(f"job {j} x{len(v)}" for j, v in by_job.items())
        try:
            await self.orch.post(post, label)
        except Exception as exc:  # noqa: BLE001 - retries exhausted for the jobs still unsettled
            for job_id in by_job:
                settled.setdefault(job_id, exc)
        for job_id, items in by_job.items():
            await self._settle_post(job_id, items, settled[job_id])

    async def _settle_post(self, job_id: int, items: list[tuple[Held, Any]], error: BaseException | None) -> None:
        if error is None:
            await self._acked(job_id, items)
        elif isinstance(error, AuthError):
            await self._give_back(items, f"token rejected: {error}")
            self._fail(FatalWorkerError(f"Antenna rejected the worker's token: {error}"))
        elif isinstance(error, Rejected) and error.status == 404:
            self.ledger.count(job_id, "dropped", len(items))
            log.warning("worker %s: job %s is gone from Antenna (404): %d results dropped", self.name, job_id, len(items))
            self._settle(items)
        elif isinstance(error, Rejected):
            await self._isolate_rejected(job_id, items, error)
        else:
            await self._give_back(items, f"posting failed after retries: {error}")

    async def _acked(self, job_id: int, items: list[tuple[Held, Any]]) -> None:
        assert self.transport is not None
        ok = sum(1 for _, res in items if isinstance(res, PipelineResultsResponse))
        self.ledger.posted(job_id, ok, len(items) - ok)
        if self.settings.ack_on_accept:
            for held, _ in items:
                for r in held.reservations():
                    await self.transport.ack(r)
        for held, _ in items:
            if held.key is not None:
                self.answered[held.key] = None
                if len(self.answered) > ANSWERED_MEMORY:
                    self.answered.popitem(last=False)
        self._settle(items)

    async def _isolate_rejected(self, job_id: int, items: list[tuple[Held, Any]], exc: Rejected) -> None:
        """Antenna refused a post (400): find which results it refuses, so one bad task fails alone.

        Each result is posted on its own; a refused one is replaced by an error result
        saying why; if Antenna refuses even that (it does not know the task), the
        message is terminated: redelivering it could never end differently.
        """
        assert self.client is not None and self.transport is not None
        log.error("worker %s: job %s refused a post of %d results: %s; posting them one by one",
                  self.name, job_id, len(items), exc)
        for held, result in items:
            attempts = [result, PipelineResultsError(error=f"result rejected by Antenna: {exc.body[:300]}",
                                                     image_id=held.r.image_id)]
            if isinstance(result, PipelineResultsError):
                attempts = attempts[:1]
            for attempt in attempts:
                try:
                    await self.client.post_results(job_id, [TaskResult(reply_subject=held.r.reply_subject, result=attempt)])
                except Rejected as again:
                    log.error("worker %s: job %s task %s (seq %s): refused: %s", self.name, job_id, held.r.image_id,
                              held.r.stream_seq, again)
                    continue
                except Exception as again:  # noqa: BLE001 - an outage now: hand it back
                    await self._give_back([(held, attempt)], f"posting failed: {again}")
                    break
                await self._acked(job_id, [(held, attempt)])
                break
            else:
                log.error("worker %s: job %s task at seq %s is unknown to Antenna: terminated (no redelivery)",
                          self.name, job_id, held.r.stream_seq)
                for r in held.reservations():
                    await self.transport.term(r)
                self.ledger.count(job_id, "terminated")
                self._settle([(held, result)])

    async def _give_back(self, items: list[tuple[Held, Any]], why: str) -> None:
        """Hand tasks back to the queue (never ack an unposted result)."""
        assert self.transport is not None
        job_id = items[0][0].r.job_id if items else -1
        log.warning("worker %s: job %s: releasing %d tasks: %s", self.name, job_id, len(items), why)
        for held, _ in items:
            for r in held.reservations():
                await self.transport.nak(r, self._release_delay())
        self.ledger.count(job_id, "released", len(items))
        self._settle(items)

    def _settle(self, items: list[tuple[Held, Any]]) -> None:
        for held, _ in items:
            self.posting.pop(id(held), None)

    def _release_delay(self) -> float:
        return self.settings.release_delay_s * random.uniform(1.0, 2.0)

    async def _release_all(self, why: str) -> None:
        """Stop: nak everything reserved but not started, with jittered delays."""
        assert self.transport is not None
        released = 0
        for job_id, queue in list(self.pool.items()):
            for held in queue:
                if held.image:
                    held.image.cancel()
                for r in held.reservations():
                    await self.transport.nak(r, self._release_delay())
                released += 1
            if queue:
                self.ledger.count(job_id, "released", len(queue))
        self.pool.clear()
        if released:
            log.info("worker %s: released %d reserved tasks (%s)", self.name, released, why)

    # --- reporting --------------------------------------------------------------------

    async def _report(self, final: bool) -> None:
        self._last_report = time.monotonic()
        try:
            await self.orch.report(self.name, self.ledger.rows(), self.ledger.totals(), final)
        except Exception as exc:  # noqa: BLE001 - reporting never stops work
            log.warning("worker %s: report failed: %s", self.name, exc)


def _trim(wants: dict[int, int], room: int) -> dict[int, int]:
    """Cut a reservation plan to ``room`` tasks, keeping its order (the fair order)."""
    out = {}
    for job_id, n in wants.items():
        if room <= 0:
            break
        take = min(n, room)
        out[job_id] = take
        room -= take
    return out
