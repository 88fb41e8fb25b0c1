"""Antenna's job plane: what its views do with the database and NATS, without the HTTP.

One :class:`JobPlane` per API process owns the store, one NATS connection
(reconnecting forever, so a NATS restart is an outage, not an error) and the
job lifecycle:

- create: rows first (CREATED, PENDING), then stream, consumer, dead-letter
  consumer and one task per image (``id == image_id``, ``reply_subject``
  null), then STARTED;
- reserve: one JetStream fetch of up to ``batch_size`` (0.5 s), as Antenna;
- results: all-or-nothing validation, then each result is queued for a
  background save (``save_workers`` asyncio tasks, Antenna's Celery workers)
  and the request answers ``queued`` at once. A save attributes the result by
  its image id, checks its algorithm keys against the pipeline's registered
  algorithms, stores it and only then publishes ``+ACK`` to its reply subject;
  a failed save is not acked, so NATS redelivers it after ack_wait;
- finish (complete or cancelled): snapshot the consumer's statistics, then
  delete consumer, stream and dead-letter consumer, as Antenna does;
- housekeeping every second: statistics are sampled, cleanups that failed
  (NATS down) are retried, and, only with ``reap_dead_letters`` (off by
  default, like Antenna's management command), dead letters become error
  results marked ``dead_lettered``.

Fault controls for the bench: :meth:`JobPlane.fail_saves` and
:meth:`JobPlane.slow_saves`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import APIError

from antenna_lab.antenna.costs import Cpu
from antenna_lab.antenna.drf import BadRequest
from antenna_lab.antenna.models import CREATED, Job, JobCreate
from antenna_lab.antenna.store import Conflict, ImageRecord, NewResult, Store
from antenna_lab.antenna.streams import JobStreams
from antenna_flows.jetstream import (
    ADVISORY_STREAM,
    QueueConfig,
    StreamGone,
    consumer_name,
    max_deliveries_subject,
    parse_ack_subject,
    stream_name,
)
from antenna_flows.schemas import (
    PipelineProcessingTask,
    PipelineResultsError,
    PipelineResultsResponse,
    QueuedTask,
    ResultsResponse,
    TaskResult,
)

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 0.5  # Antenna's /tasks fetch
NATS_CONNECT_TIMEOUT_S = 5.0
SAVE_WORKERS = 2  # Antenna's Celery result-saving concurrency, scaled to a laptop
NATS_DOWN_ERRORS = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.FlushTimeoutError,
    asyncio.TimeoutError,
    OSError,
)


class NatsUnavailable(Exception):
    """NATS cannot be reached now: the API answers 503 and changes nothing."""


class SaveFailed(Exception):
    """A background save that did not happen (unknown algorithm, unknown image, injected fault): not acked."""


@dataclass(frozen=True)
class QueuedSave:
    """One result waiting for a save worker: which job, the subject to ack after the save, the result."""

    job_id: int
    reply_subject: str
    result: Any
    task_id: str
    queued_at: float


class JobPlane:
    def __init__(
        self,
        store: Store,
        nats_url: str,
        queue_config: QueueConfig | None = None,
        *,
        save_workers: int = SAVE_WORKERS,
        reap_dead_letters: bool = False,
        seed: int = 0,
        save_s_per_result: float = 0.0,
        cpu: Cpu | None = None,
    ):
        self.store = store
        self.nats_url = nats_url
        self.queue_config = queue_config or QueueConfig()
        self.queue: JobStreams | None = None
        self.save_workers = max(1, save_workers)
        self.reap_dead_letters = reap_dead_letters
        self._finishing: set[int] = set()
        self._gone_reported: set[int] = set()
        self._refusals_logged: set[tuple[int, str]] = set()
        self._stopping = asyncio.Event()
        self._saves: asyncio.Queue[QueuedSave] | None = None
        self._saving = 0  # saves taken off the queue and not yet done
        self._savers: list[asyncio.Task[None]] = []
        self._rng = random.Random(seed)
        self._fail_saves_until = 0.0
        self._fail_saves_fraction = 0.0
        self._slow_saves_until = 0.0
        self._slow_saves_delay_s = 0.0
        self.saves_done = 0
        self.saves_failed = 0
        self.save_s_per_result = max(0.0, save_s_per_result)  # what one save costs (the cost model)
        self.cpu = cpu or Cpu(None)  # where that cost is spent (shared with the web workers when modelled)
        self.save_queue_peak = 0  # results accepted and not yet saved, at most
        self._answered: dict[int, dict[str, float]] = {}  # job -> image (or reply subject) -> first acceptance
        self._save_delays: dict[int, list[float]] = {}  # job -> acceptance-to-save seconds of each stored save
        self._unsaved: dict[tuple[int, str], int] = {}  # (job, image key) -> its answers accepted, not yet saved
        self._dead_waiting: dict[int, set[int]] = {}  # job -> dead-lettered stream seqs whose answer is being saved

    # --- fault controls (the bench's save_errors and slow_saves) -----------------------------

    def fail_saves(self, seconds: float, fraction: float = 1.0) -> None:
        """For ``seconds``, that ``fraction`` of background saves fail (seeded RNG): nothing stored, no ack."""
        self._fail_saves_until = time.monotonic() + seconds
        self._fail_saves_fraction = min(max(fraction, 0.0), 1.0)
        log.warning("fault: %.0f%% of result saves fail for %.1fs", 100 * self._fail_saves_fraction, seconds)

    def slow_saves(self, seconds: float, delay_s: float) -> None:
        """For ``seconds``, each background save (and so its ack) starts ``delay_s`` late (a backlogged Celery)."""
        self._slow_saves_until = time.monotonic() + seconds
        self._slow_saves_delay_s = max(delay_s, 0.0)
        log.warning("fault: result saves lag by %.2fs for %.1fs", delay_s, seconds)

    @property
    def saves_pending(self) -> int:
        """Results accepted and not yet saved (or failed)."""
        return (self._saves.qsize() if self._saves is not None else 0) + self._saving

    async def wait_saved(self, timeout: float = 10.0) -> None:
        """Until every accepted result has been saved or has failed (tests and the bench)."""
        deadline = time.monotonic() + timeout
        while self.saves_pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.saves_pending} result saves still pending after {timeout}s")
            await asyncio.sleep(0.01)

    def start_savers(self) -> None:
        """Start the save workers on the running loop (the app's lifespan)."""
        self._saves = asyncio.Queue()
        self._savers = [asyncio.create_task(self._save_worker(i), name=f"save-worker-{i}") for i in range(self.save_workers)]

    async def stop_savers(self, timeout: float = 2.0) -> None:
        """Finish what is queued (up to ``timeout``), then stop; unsaved results stay unacked (NATS redelivers)."""
        try:
            await self.wait_saved(timeout)
        except TimeoutError as exc:
            log.warning("stopping with unsaved results: %s", exc)
        for task in self._savers:
            task.cancel()
        await asyncio.gather(*self._savers, return_exceptions=True)
        self._savers = []

    async def connect(self) -> None:
        """Connect once NATS answers (within NATS_CONNECT_TIMEOUT_S); from then on reconnect forever."""
        try:
            self.queue = await asyncio.wait_for(
                JobStreams.connect(self.nats_url, self.queue_config, name="antenna-flows-api"), NATS_CONNECT_TIMEOUT_S
            )
        except asyncio.TimeoutError:
            raise NatsUnavailable(f"NATS at {self.nats_url} did not answer within {NATS_CONNECT_TIMEOUT_S}s") from None
        log.info("API connected to NATS at %s", self.nats_url)

    async def close(self) -> None:
        if self.queue is not None:
            await self.queue.close()

    @property
    def nats_connected(self) -> bool:
        return self.queue is not None and self.queue.nc.is_connected

    def _queue(self) -> JobStreams:
        if self.queue is None or not self.queue.nc.is_connected:
            raise NatsUnavailable(f"NATS at {self.nats_url} is unreachable")
        return self.queue

    # --- jobs -------------------------------------------------------------------------

    async def create_job(self, request: JobCreate) -> Job:
        images = [(ref.id, ref.url) for ref in request.image_refs()]
        self._queue()  # fail before writing anything
        try:
            job, rows = self.store.create_job(
                job_id=request.id,
                name=request.name,
                project_id=request.project_id,
                pipeline_slug=request.pipeline,
                priority=request.priority,
                dispatch_mode=request.dispatch_mode,
                images=images,
                ack_wait_s=self.queue_config.ack_wait_s,
                max_deliver=self.queue_config.max_deliver,
            )
        except Conflict as exc:
            raise BadRequest({exc.field: [str(exc)]}) from exc
        log.info("job %s created: %d images, pipeline %s, priority %s", job.id, job.total, job.pipeline_slug, job.priority)
        if not request.start:
            return job
        self.store.mark_pending(job.id)
        try:
            return await self._start(job, rows)
        except NatsUnavailable:
            self.store.discard_job(job.id)
            raise

    async def run_job(self, job: Job) -> Job:
        """Start a CREATED job (Antenna's ``/jobs/{id}/run/``); any other state is left as is."""
        if job.status != CREATED:
            return job
        self.store.mark_pending(job.id)
        return await self._start(job, self.store.images(job.id))

    async def _start(self, job: Job, images: list[ImageRecord]) -> Job:
        """Fresh stream and consumers, then the tasks, one per image in order (task k at stream seq k).

        The job is STARTED with those expected sequences before the first
        publish: a worker bound to the consumer may post a result before the
        last task is out, and its reply subject must already find its image.
        """
        queue = self._queue()
        started = time.perf_counter()
        tasks = [PipelineProcessingTask(id=i.image_id, image_id=i.image_id, image_url=i.url) for i in images]
        expected = {t.image_id: seq for seq, t in enumerate(tasks, start=1)}
        try:
            # A stream or advisories left under this id by an earlier life of the server
            # (an external NATS, a wiped database) belong to another job: drop them.
            await queue.ensure_advisory_stream()
            await queue.delete_job(job.id)
            await queue.js.purge_stream(ADVISORY_STREAM, subject=max_deliveries_subject(job.id))
            await queue.create_job(job.id)
            job = self.store.start_job(job.id, expected)
            seqs = await queue.publish_tasks(job.id, tasks)
        except NATS_DOWN_ERRORS as exc:
            self.store.unstart_job(job.id)
            raise NatsUnavailable(f"NATS failed while starting job {job.id}: {exc!r}") from exc
        actual = {t.image_id: seq for t, seq in zip(tasks, seqs)}
        if actual != expected:  # someone else published on the job's subject meanwhile
            log.warning("job %s: tasks did not land at stream seqs 1..%d; recording where they are", job.id, len(seqs))
            self.store.record_stream_seqs(job.id, actual)
        log.info(
            "job %s started: %d tasks published to %s in %.2fs (ack_wait %.1fs, max_deliver %d)",
            job.id, len(seqs), stream_name(job.id), time.perf_counter() - started, job.ack_wait_s, job.max_deliver,
        )
        return job

    async def live(self, job: Job) -> Job:
        """The job with its consumer's statistics read now (the stored ones once its stream is gone or NATS is down).

        A job that just completed keeps its stream until the save worker's
        snapshot-then-delete runs; reading it meanwhile gives the final figures,
        not a sample up to a second old.
        """
        if not self.nats_connected:
            return job
        if not job.active and (job.final is False or job.id not in self.store.uncleaned_job_ids()):
            return job
        try:
            stats = await self.queue.stats(job.id)  # type: ignore[union-attr]
        except (StreamGone, *NATS_DOWN_ERRORS):
            return self.store.job(job.id) or job  # deleted meanwhile: the snapshot taken just before
        self.store.set_stats(job.id, stats)
        return self.store.job(job.id) or job

    async def cancel(self, job: Job) -> Job:
        if self.store.cancel_job(job.id):
            log.info("job %s cancelled (%d of %d images processed)", job.id, job.processed, job.total)
            await self.finish(job.id)
        return self.store.job(job.id) or job

    async def finish(self, job_id: int) -> None:
        """Snapshot the consumer's statistics, then delete its NATS resources (retried by housekeeping)."""
        if job_id in self._finishing or not self.nats_connected:
            return
        self._finishing.add(job_id)
        try:
            queue = self._queue()
            try:
                self.store.set_stats(job_id, await queue.stats(job_id))
            except StreamGone:
                pass
            await queue.delete_job(job_id)
            self.store.mark_cleaned(job_id)
            job = self.store.job(job_id)
            if job is not None:
                log.info(
                    "job %s %s: %d results, %d errors, %d duplicates, %d redeliveries; stream and consumers deleted",
                    job_id, job.status, job.results, job.errors, job.duplicates, job.redeliveries,
                )
        except (NatsUnavailable, *NATS_DOWN_ERRORS) as exc:
            log.warning("job %s: NATS cleanup failed (%r); retrying in the background", job_id, exc)
        finally:
            self._finishing.discard(job_id)

    # --- tasks ---------------------------------------------------------------------------

    async def reserve(
        self, job: Job, batch_size: int, seen: Callable[[], None] | None = None
    ) -> list[PipelineProcessingTask]:
        """Antenna's ``/tasks``: one fetch of up to ``batch_size`` tasks, each with its reply subject.

        ``seen`` (the liveness heartbeat) is called where Antenna's view calls it: once the job is
        known to be async and active, before the fetch."""
        if job.dispatch_mode != "async_api":
            raise BadRequest(["Only async_api jobs have fetchable tasks"])
        if not job.active:
            return []
        if seen is not None:
            seen()
        queue = self._queue()
        try:
            msgs = await queue.fetch(job.id, batch_size, timeout=FETCH_TIMEOUT_S)
        except StreamGone:
            return []
        except APIError as exc:  # e.g. 409 max_ack_pending reached: nothing to hand out now
            log.info("job %s: fetch refused by JetStream: %s", job.id, exc)
            return []
        except NATS_DOWN_ERRORS as exc:
            raise NatsUnavailable(f"NATS fetch failed for job {job.id}: {exc!r}") from exc
        return [self._task(job.id, msg) for msg in msgs]

    @staticmethod
    def _task(job_id: int, msg: Msg) -> PipelineProcessingTask:
        """The message as a task with its reply subject; a malformed body is handed out all the same.

        Antenna parses each body into its task schema and would fail the whole
        batch on one bad message, leaving every task of it reserved until
        ack_wait. Here every message reaches a worker: fields that parse are
        kept and the rest blanked (so the task still fits the schema and a
        strict client's batch parse succeeds); the worker then fails that task
        alone (an empty URL cannot be downloaded) and posts an error result,
        which the API attributes by the stream sequence in the reply subject.
        """
        try:
            task = PipelineProcessingTask.model_validate_json(msg.data)
        except ValueError:
            try:
                body = json.loads(msg.data)
            except ValueError:
                body = None
            fields = body if isinstance(body, dict) else {}
            task = PipelineProcessingTask(
                **{k: _text(fields.get(k)) for k in ("id", "image_id", "image_url")}
            )
            log.warning(
                "job %s: malformed task body at stream seq %s (%r); handed out with blank fields",
                job_id, getattr(parse_ack_subject(msg.reply or ""), "stream_seq", "?"), msg.data[:120],
            )
        task.reply_subject = msg.reply
        return task

    # --- results -----------------------------------------------------------------------------

    async def accept_results(self, job: Job, results: list[TaskResult]) -> ResultsResponse:
        """Antenna's ``/result``: queue each (already validated) result for a background save and answer at once.

        Nothing is saved or acked here: a save worker does both, later. Any
        ``reply_subject`` string is accepted; it is only where the ``+ACK``
        goes after the save.
        """
        if self._saves is None:
            raise NatsUnavailable("the result queue is not running")
        now = time.monotonic()
        queued = [QueuedSave(job.id, r.reply_subject, r.result, uuid.uuid4().hex, now) for r in results]
        answered = self._answered.setdefault(job.id, {})
        wall = time.time()
        for item in queued:
            self._saves.put_nowait(item)
            key = _answer_key(item)
            answered.setdefault(key, wall)
            self._unsaved[(job.id, key)] = self._unsaved.get((job.id, key), 0) + 1
        self.save_queue_peak = max(self.save_queue_peak, self.saves_pending)
        return ResultsResponse(
            job_id=job.id,
            results_queued=len(queued),
            tasks=[QueuedTask(reply_subject=q.reply_subject, task_id=q.task_id) for q in queued],
        )

    async def _save_worker(self, index: int) -> None:
        assert self._saves is not None
        while True:
            item = await self._saves.get()
            self._saving += 1
            try:
                await self._save_one(item)
            except SaveFailed as exc:
                self.saves_failed += 1
                log.log(exc.args[1] if len(exc.args) > 1 else logging.WARNING,
                        "job %s: save of task %s failed, not acked (NATS redelivers): %s",
                        item.job_id, item.task_id, exc.args[0])
            except Exception:  # noqa: BLE001 - a save worker outlives any one bad save, as a Celery worker does
                self.saves_failed += 1
                log.exception("job %s: save of task %s crashed; not acked", item.job_id, item.task_id)
            else:
                self.saves_done += 1
            finally:
                self._saving -= 1
                pending = (item.job_id, _answer_key(item))
                self._unsaved[pending] = self._unsaved.get(pending, 1) - 1
                if self._unsaved[pending] <= 0:
                    del self._unsaved[pending]
                self._saves.task_done()

    async def _save_one(self, item: QueuedSave) -> None:
        """Antenna's ``process_nats_pipeline_result``: save, then ack; any failure leaves the message unacked.

        With a cost model, a save (stored, refused or failed alike) holds its save worker
        ``save_s_per_result`` first: the time Antenna's Celery spends on one result.
        """
        await self.cpu.run(self.save_s_per_result)
        now = time.monotonic()
        if now < self._slow_saves_until and self._slow_saves_delay_s > 0:
            # Latency, not throughput: a save lands delay_s after it was queued (a backlog of that age),
            # so the save workers are not turned into a 1/delay_s bottleneck.
            await asyncio.sleep(max(0.0, item.queued_at + self._slow_saves_delay_s - now))
        if time.monotonic() < self._fail_saves_until and self._rng.random() < self._fail_saves_fraction:
            raise SaveFailed("injected save fault", logging.INFO)
        job = self.store.job(item.job_id)
        if job is None:
            raise SaveFailed(f"job {item.job_id} does not exist")
        try:
            image_id = self._image_of(job, item)
        except SaveFailed:
            if not isinstance(item.result, PipelineResultsError):
                raise
            # An error result for no image of the job: nothing to record, but the task is done (acked), as
            # Antenna's error path, which only counts the failed image ids it finds.
            log.warning("job %s: error result for no image of the job (%s); acked, not stored", job.id, item.result.error[:200])
            await self._ack(job.id, item.reply_subject, "?")
            return
        if isinstance(item.result, PipelineResultsResponse):
            self._check_algorithms(job, item.result)
        outcome = self.store.save_results(
            job.id,
            [
                NewResult(
                    image_id=image_id,
                    kind="error" if isinstance(item.result, PipelineResultsError) else "ok",
                    payload=item.result.model_dump_json(),
                    num_delivered=_num_delivered(item.reply_subject),
                )
            ],
        )
        if outcome.duplicates:
            log.info("job %s: duplicate result for image %s", job.id, image_id)
        self._save_delays.setdefault(job.id, []).append(time.monotonic() - item.queued_at)
        await self._ack(job.id, item.reply_subject, image_id)
        if outcome.completed:
            await self.finish(job.id)

    async def _ack(self, job_id: int, reply_subject: str, image_id: str) -> None:
        try:
            if self.queue is None:
                raise NatsUnavailable("not connected")
            await self.queue.ack(reply_subject)
        except (NatsUnavailable, *NATS_DOWN_ERRORS) as exc:  # saved, not acked: redelivered, and the save dedupes
            log.warning("job %s: ack of image %s failed (%r); it will be redelivered", job_id, image_id, exc)

    def _image_of(self, job: Job, item: QueuedSave) -> str:
        """The job's image this result is for: ``source_images[].id`` or ``error.image_id``, as Antenna.

        Our extension: a result naming no image at all (an error for a
        malformed task, whose image id is blank) is attributed by the stream
        sequence in its reply subject when that is one of the job's ack
        subjects. Otherwise :class:`SaveFailed` (a success is then not acked;
        an error result is acked without being stored).
        """
        result = item.result
        if isinstance(result, PipelineResultsError):
            candidates = [result.image_id] if result.image_id else []
        else:
            candidates = [s.id for s in result.source_images] + [d.source_image_id for d in result.detections]
        known = self.store.image_ids(job.id, candidates)
        for candidate in candidates:
            if candidate in known:
                return candidate
        ack = parse_ack_subject(item.reply_subject) if not any(candidates) else None
        if ack is not None and ack.stream == stream_name(job.id) and ack.consumer == consumer_name(job.id):
            by_seq = self.store.images_by_seq(job.id, [ack.stream_seq])
            if ack.stream_seq in by_seq:
                return by_seq[ack.stream_seq]
        raise SaveFailed(f"the result names no image of job {job.id} (image ids {candidates[:5]})")

    def _check_algorithms(self, job: Job, result: PipelineResultsResponse) -> None:
        """Antenna's ``save_results`` (``ami/ml/models/pipeline.py``), in its order: the result's pipeline
        must have exactly one detection algorithm (none: ``ValueError``; two or more, e.g. a real
        detector and a sim one declared on the same slug: ``NotImplementedError("Multiple detection
        algorithms per pipeline are not supported")``), and every algorithm key the result names must
        be registered for it (``PipelineNotConfigured``). Either way the save fails and is not acked.
        The pipeline is the one the result names (``results.pipeline``, as Antenna), in the job's project."""
        slug = result.pipeline
        detectors = self.store.detection_algorithms(job.project_id, slug)
        if len(detectors) != 1:
            problem = ("ValueError: Pipeline does not have a detection algorithm" if not detectors else
                       "NotImplementedError: Multiple detection algorithms per pipeline are not supported "
                       f"(pipeline {slug!r} of project {job.project_id} has {', '.join(detectors)})")
            first = (job.id, problem) not in self._refusals_logged
            self._refusals_logged.add((job.id, problem))
            raise SaveFailed(problem, logging.WARNING if first else logging.DEBUG)
        known = self.store.algorithm_keys(job.project_id, slug)
        for detection in result.detections:
            problem = None
            if detection.algorithm.key not in known:
                problem = f"Detection algorithm {detection.algorithm.key} is not a known algorithm."
            else:
                for classification in detection.classifications:
                    if classification.algorithm.key not in known:
                        problem = f"Classification algorithm {classification.algorithm.key} is not a known algorithm."
                        break
            if problem:
                message = (
                    f"PipelineNotConfigured: {problem} The processing service must declare it in the /info "
                    f"endpoint. Known algorithms for pipeline {slug!r} of project {job.project_id}: "
                    f"{sorted(known)}"
                )
                first = (job.id, problem) not in self._refusals_logged
                self._refusals_logged.add((job.id, problem))
                raise SaveFailed(message, logging.WARNING if first else logging.DEBUG)

    # --- what the saves did (the bench's figures) ------------------------------------------------

    def reset_save_stats(self) -> None:
        """Forget the save queue's peak so far (the bench, at time zero)."""
        self.save_queue_peak = self.saves_pending

    def answered_at(self, job_id: int) -> dict[str, float]:
        """Per image (its id; its reply subject when the result names none): when its first answer was
        accepted (unix seconds). The time the worker delivered it, before any save."""
        return dict(self._answered.get(job_id, {}))

    def save_delays(self, job_id: int) -> list[float]:
        """Seconds from acceptance to save, for each of the job's results stored (duplicates included)."""
        return list(self._save_delays.get(job_id, []))

    # --- housekeeping ----------------------------------------------------------------------

    async def housekeeping(self, interval_s: float) -> None:
        """Run :meth:`housekeep` every ``interval_s`` until :meth:`stop_housekeeping`.

        Stopped by a flag, not by cancellation alone: nats-py swallows a
        CancelledError that lands while it flushes a publish
        (``Client._flush_pending``), which would leave this loop running forever.
        """
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), interval_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await self.housekeep()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad round
                log.exception("API housekeeping round failed")

    def stop_housekeeping(self) -> None:
        self._stopping.set()

    async def housekeep(self) -> None:
        """One round: statistics samples, retried cleanups, and (``reap_dead_letters``) dead letters to error results."""
        if not self.nats_connected:
            return
        queue = self.queue
        assert queue is not None
        for job_id in self.store.active_job_ids():
            try:
                if self.reap_dead_letters:
                    seqs = await queue.dead_letters(job_id) + sorted(self._dead_waiting.pop(job_id, ()))
                    if seqs and self._dead_letters(job_id, seqs):
                        await self.finish(job_id)
                        continue
                self.store.set_stats(job_id, await queue.stats(job_id))
                self._gone_reported.discard(job_id)
            except StreamGone:
                job = self.store.job(job_id)
                if job is None or not job.active:  # it finished while this round ran
                    continue
                if job_id not in self._gone_reported:
                    self._gone_reported.add(job_id)
                    log.warning("job %s is active but its stream or consumer is gone: it cannot progress", job_id)
            except NATS_DOWN_ERRORS as exc:
                log.debug("housekeeping of job %s interrupted: %r", job_id, exc)
                return
        for job_id in self.store.uncleaned_job_ids():
            await self.finish(job_id)

    def _dead_letters(self, job_id: int, seqs: list[int]) -> bool:
        """Record an error result for each dead-lettered image without one; True if that completed the job.

        An image whose last delivery was answered, with that answer still in the save queue, is no dead
        letter yet (a slow save queue, as Antenna's under load): it is looked at again at the next round,
        and reaped only if its saves are done and none stored a result."""
        job = self.store.job(job_id)
        if job is None:
            return False
        images = self.store.images_by_seq(job_id, seqs)
        waiting = {s for s in seqs if s in images and self._unsaved.get((job_id, images[s]))}
        if waiting:
            self._dead_waiting.setdefault(job_id, set()).update(waiting)
        hits = [images[s] for s in seqs if s in images and s not in waiting]
        error = f"task exceeded max_deliver ({job.max_deliver} deliveries) without a result"
        outcome = self.store.record_dead_letters(job_id, hits, error)
        new = [image_id for image_id, stored in zip(hits, outcome.stored) if stored]
        if new:
            log.warning("job %s: %d images exceeded max_deliver without a result: %s", job_id, len(new), ", ".join(new[:10]))
        return outcome.completed


def _answer_key(item: QueuedSave) -> str:
    """The image a queued result answers, as far as the result says (before any lookup)."""
    result = item.result
    if isinstance(result, PipelineResultsError):
        return result.image_id or item.reply_subject
    ids = [source.id for source in result.source_images] if isinstance(result, PipelineResultsResponse) else []
    return ids[0] if ids else item.reply_subject


def _num_delivered(reply_subject: str) -> int | None:
    ack = parse_ack_subject(reply_subject)
    return ack.num_delivered if ack is not None else None


def _text(value: object) -> str:
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""

