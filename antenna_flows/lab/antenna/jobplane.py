"""Antenna's job plane: what its views do with the database and NATS, without the HTTP.

One :class:`JobPlane` per API process owns the store, one NATS connection
(reconnecting forever, so a NATS restart is an outage, not an error) and the
job lifecycle:

- create: rows first, then stream, consumer, dead-letter consumer and one
  task per image (``id == image_id``), then STARTED;
- reserve: one JetStream fetch of up to ``batch_size`` (0.5 s), as Antenna;
- results: all-or-nothing validation, then save, then ``+ACK`` (Antenna acks
  only after the save, so a lost save is redelivered, never lost);
- finish (complete or cancelled): snapshot the consumer's statistics, then
  delete consumer, stream and dead-letter consumer, as Antenna does;
- housekeeping every second: dead letters become error results (how a task
  that exhausted ``max_deliver`` ends deliberately), statistics are sampled,
  and cleanups that failed (NATS down) are retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import APIError

from antenna_flows.lab.antenna.drf import BadRequest, add_error
from antenna_flows.lab.antenna.models import CREATED, Job, JobCreate
from antenna_flows.lab.antenna.store import Conflict, ImageRecord, NewResult, Store
from antenna_flows.lab.antenna.streams import JobStreams
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
    QueuedTask,
    ResultsResponse,
    TaskResult,
)

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 0.5  # Antenna's /tasks fetch
NATS_CONNECT_TIMEOUT_S = 5.0
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


@dataclass(frozen=True)
class Attributed:
    """A result tied to its job's image through the stream sequence in its reply subject."""

    reply_subject: str
    image_id: str
    num_delivered: int
    result: Any


class JobPlane:
    def __init__(self, store: Store, nats_url: str, queue_config: QueueConfig | None = None):
        self.store = store
        self.nats_url = nats_url
        self.queue_config = queue_config or QueueConfig()
        self.queue: JobStreams | None = None
        self._finishing: set[int] = set()
        self._gone_reported: set[int] = set()
        self._stopping = asyncio.Event()

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
        try:
            return await self._start(job, rows)
        except NatsUnavailable:
            self.store.discard_job(job.id)
            raise

    async def run_job(self, job: Job) -> Job:
        """Start a CREATED job (Antenna's ``/jobs/{id}/run/``); any other state is left as is."""
        if job.status != CREATED:
            return job
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
        """The job with its consumer's statistics read now (the stored ones if it is not active or NATS is down)."""
        if not job.active or not self.nats_connected:
            return job
        try:
            stats = await self.queue.stats(job.id)  # type: ignore[union-attr]
        except (StreamGone, *NATS_DOWN_ERRORS):
            return job
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

    async def reserve(self, job: Job, batch_size: int) -> list[PipelineProcessingTask]:
        """Antenna's ``/tasks``: one fetch of up to ``batch_size`` tasks, each with its reply subject."""
        if job.dispatch_mode != "async_api":
            raise BadRequest({"detail": f"Job {job.id} is not an async_api job (dispatch_mode {job.dispatch_mode})."})
        if not job.active:
            return []
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

    def attribute(self, job: Job, results: list[TaskResult]) -> list[Attributed]:
        """Tie each result to an image of this job by its reply subject; BadRequest naming every bad one."""
        parsed = [parse_ack_subject(r.reply_subject) for r in results]
        known = self.store.images_by_seq(job.id, [p.stream_seq for p in parsed if p is not None])
        errors: dict[str, Any] = {}
        out = []
        for i, (result, ack) in enumerate(zip(results, parsed)):
            problem = None
            if ack is None:
                problem = "Not a JetStream ack subject."
            elif ack.stream != stream_name(job.id) or ack.consumer != consumer_name(job.id):
                problem = f"Not an ack subject of job {job.id}'s consumer {consumer_name(job.id)}."
            elif ack.stream_seq not in known:
                problem = f"Job {job.id} has no task at stream sequence {ack.stream_seq}."
            if problem:
                add_error(errors, ("results", i, "reply_subject"), problem)
            else:
                out.append(Attributed(result.reply_subject, known[ack.stream_seq], ack.num_delivered, result.result))
        if errors:
            errors["results"] += [{}] * (len(results) - len(errors["results"]))
            raise BadRequest(errors)
        return out

    async def accept_results(self, job: Job, results: list[TaskResult]) -> ResultsResponse:
        """Validate all, then save each result and ack it (save first, as Antenna); finish a completed job."""
        attributed = self.attribute(job, results)
        queue = self._queue()
        outcome = self.store.save_results(
            job.id,
            [
                NewResult(
                    image_id=a.image_id,
                    kind="error" if isinstance(a.result, PipelineResultsError) else "ok",
                    payload=a.result.model_dump_json(),
                    num_delivered=a.num_delivered,
                )
                for a in attributed
            ],
        )
        for a in attributed:
            try:
                await queue.ack(a.reply_subject)
            except NATS_DOWN_ERRORS as exc:  # saved but not acked: NATS redelivers, the save dedupes
                log.warning("job %s: ack of image %s failed (%r); it will be redelivered", job.id, a.image_id, exc)
        if outcome.duplicates:
            dupes = [a.image_id for a, s in zip(attributed, outcome.stored) if not s]
            log.info("job %s: %d duplicate results (images %s)", job.id, len(dupes), ", ".join(dupes[:10]))
        if outcome.completed:
            await self.finish(job.id)
        return ResultsResponse(
            job_id=job.id,
            results_queued=len(attributed),
            tasks=[QueuedTask(reply_subject=a.reply_subject, task_id=uuid.uuid4().hex) for a in attributed],
        )

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
        """One round: dead letters to error results, statistics samples, retried cleanups."""
        if not self.nats_connected:
            return
        queue = self.queue
        assert queue is not None
        for job_id in self.store.active_job_ids():
            try:
                seqs = await queue.dead_letters(job_id)
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
        """Record an error result for each dead-lettered image without one; True if that completed the job."""
        job = self.store.job(job_id)
        if job is None:
            return False
        images = self.store.images_by_seq(job_id, seqs)
        hits = [images[s] for s in seqs if s in images]
        error = f"task exceeded max_deliver ({job.max_deliver} deliveries) without a result"
        outcome = self.store.record_dead_letters(job_id, hits, error)
        new = [image_id for image_id, stored in zip(hits, outcome.stored) if stored]
        if new:
            log.warning("job %s: %d images exceeded max_deliver without a result: %s", job_id, len(new), ", ".join(new[:10]))
        return outcome.completed


def _text(value: object) -> str:
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""

