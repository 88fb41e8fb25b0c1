"""The upstream worker's consumption pattern, re-created faithfully to measure against.

What ``ami worker`` (RolnickLab/ami-data-companion, ``trapdata/antenna/worker.py``
and ``datasets.py``) does, per the contract's last section:

1. ``GET /jobs/?ids_only=1&incomplete_only=1...`` without a limit: Antenna
   answers one random incomplete job; none -> sleep 5 s and poll again. The GET
   is retried 3x on 5xx and connection errors (upstream's ``get_http_session``).
2. Drain that job: ``loaders`` DataLoader subprocesses each loop
   ``POST /jobs/{id}/tasks/ {batch_size}`` -> download the batch's images ->
   hand the batch over, holding up to ``prefetch`` batches ahead of the GPU,
   until the job answers no tasks.
3. The GPU process runs the batches serially; results are posted by 2
   threads (at most 5 posts pending), never retried; Antenna acks them.
4. A job that fails (model load, anything unexpected) is logged and the loop
   goes on to the next poll, as upstream catches per job.

Nothing here extends (+WPI), releases or interleaves: that is the point. The
same model, image loader (the model's ``decode``/``prepare`` fast path, as the
fair worker feeds it) and metrics as the fair worker keep the comparison about
scheduling alone.

Start phase: a real fleet is somewhere inside its 5 s idle sleep when a job
arrives. Under the bench (``AMI_DRAIN_START_FILE``) the worker loads and warms
up its models, says it is ready, then waits for the bench's start file
(``{"t0": unix time, "phase_s": p, "sleep_s": s}``) and makes its first poll at
``t0 + s - p``: it was ``p`` seconds into its sleep at time zero.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from antenna_flows.accounting import BatchLog, Ledger
from antenna_flows.antenna_client import AntennaClient, AuthError, Unavailable
from antenna_flows.imageloader import ImageError, ImageLoader
from antenna_flows.jetstream import parse_ack_subject
from antenna_flows.models.base import ImageInput, Model
from antenna_flows.schemas import PipelineProcessingTask, PipelineResultsError, TaskResult
from antenna_flows.settings import WorkerSettings
from antenna_lab.settings import DrainSettings

log = logging.getLogger(__name__)

RESULT_POSTERS = 2  # upstream: 2 posting threads
MAX_PENDING_POSTS = 5  # upstream: at most 5 pending posts
GET_RETRIES = 3  # upstream: GETs retry 3x on 5xx (urllib3 Retry on its requests session)
GET_BACKOFF_S = 0.3  # upstream's backoff factor: 0.3, 0.6, 1.2 s between tries
START_FILE_ENV = "AMI_DRAIN_START_FILE"  # the bench's time-zero signal (see the module docstring)


@dataclass
class LoadedBatch:
    job_id: int
    tasks: list[PipelineProcessingTask]
    images: list[Any]  # PIL image or ImageError
    reserved_at: float
    loader: int


class DrainWorker:
    def __init__(self, settings: WorkerSettings, model: Model, config: DrainSettings | None = None):
        self.settings = settings
        self.name = settings.worker_name
        self.model = model
        self.config = config or DrainSettings()
        self.served = sorted(settings.pipelines or model.pipelines())
        self.ledger = Ledger(worker=self.name)
        self._stop = asyncio.Event()
        self._slot = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slot-{self.name}")
        self._metrics = BatchLog(settings.metrics_file, self.name)
        self._post_sem = asyncio.Semaphore(MAX_PENDING_POSTS)
        self._posters = asyncio.Semaphore(RESULT_POSTERS)
        self._posts: set[asyncio.Task[Any]] = set()
        # The model's own feeding hooks, exactly as the fair worker uses them (decode bytes, else PIL + prepare).
        self._decode = getattr(model, "decode", None)
        self._prepare = getattr(model, "prepare", None) or getattr(model, "host_tensor", None)

    def stop(self, reason: str = "requested") -> None:
        log.info("drain worker %s: stopping (%s)", self.name, reason)
        self._stop.set()

    async def run(self) -> dict[str, Any]:
        s = self.settings
        self.client = AntennaClient(s.antenna_api_url, s.antenna_api_token, timeout_s=s.http_timeout_s, worker_name=self.name)
        self.loader = ImageLoader.from_settings(s)
        stopper = asyncio.create_task(self._stop_after(s.max_runtime_s)) if s.max_runtime_s else None
        try:
            await self._prepare_models()
            if s.ready_file:
                s.ready_file.touch()
            await self._wait_start()
            while not self._stop.is_set():
                try:
                    jobs = await self._list_jobs()
                except AuthError:
                    raise
                except Exception as exc:  # noqa: BLE001 - upstream logs and sleeps
                    log.error("drain worker %s: job poll failed: %s", self.name, exc)
                    jobs = []
                any_work = False
                for job in jobs:
                    if job.pipeline_slug not in self.served:
                        continue
                    log.info("drain worker %s: processing job %s (%s)", self.name, job.id, job.pipeline_slug)
                    try:
                        any_work = await self._process_job(job.id, job.pipeline_slug) or any_work
                    except AuthError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - upstream catches per job and polls again
                        log.exception("drain worker %s: job %s failed: %s", self.name, job.id, exc)
                if not any_work:
                    await self._sleep(self.config.drain_idle_sleep_s)
        finally:
            if stopper:
                stopper.cancel()
            await asyncio.gather(*self._posts, return_exceptions=True)
            await self.client.aclose()
            await self.loader.aclose()
            self._slot.shutdown(wait=False, cancel_futures=True)
            self._metrics.close()
        return self.ledger.totals()

    async def _prepare_models(self) -> None:
        """Load and warm up every served pipeline before saying ready, as the fair worker does,
        so start-up (reported apart) holds model loading for both. A pipeline that cannot
        load is logged and tried again per job, where upstream loads it."""
        loop = asyncio.get_running_loop()
        warm = getattr(self.model, "warmup_input", None)
        for pipeline in self.served:
            try:
                await loop.run_in_executor(self._slot, self.model.load, pipeline)
                if warm is not None:
                    task = PipelineProcessingTask(id="warmup", image_id="warmup", image_url="warmup")
                    await loop.run_in_executor(self._slot, self.model.predict, pipeline, [ImageInput(task, warm())])
            except Exception as exc:  # noqa: BLE001 - upstream finds out per job
                log.warning("drain worker %s: %s not loaded at start: %s", self.name, pipeline, exc)

    async def _wait_start(self) -> None:
        """Under the bench: wait for time zero, then for the rest of the idle sleep we were in."""
        path = os.environ.get(START_FILE_ENV)
        if not path:
            return
        start = Path(path)
        while not start.exists() and not self._stop.is_set():
            await asyncio.sleep(0.02)
        try:
            spec = json.loads(start.read_text())
        except (OSError, ValueError):
            return
        first_poll = float(spec["t0"]) + float(spec.get("sleep_s", self.config.drain_idle_sleep_s)) - float(spec["phase_s"])
        wait = first_poll - time.time()
        log.info("drain worker %s: start phase %.3fs into a %.1fs sleep: first poll in %.3fs", self.name,
                 float(spec["phase_s"]), float(spec.get("sleep_s", self.config.drain_idle_sleep_s)), max(0.0, wait))
        if wait > 0:
            await self._sleep(wait)

    async def _list_jobs(self) -> list[Any]:
        """GET /jobs/ (one random job), retried 3x on 5xx and connection errors as upstream's session does."""
        for attempt in range(GET_RETRIES + 1):
            try:
                return await self.client.list_jobs(self.served, limit=None)
            except Unavailable:
                if attempt == GET_RETRIES:
                    raise
                await asyncio.sleep(GET_BACKOFF_S * 2 ** attempt)
        return []

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _stop_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.stop(f"max_runtime_s={seconds:g} reached")

    async def _process_job(self, job_id: int, pipeline: str) -> bool:
        """The DataLoader drain: loaders reserve and download ahead; the GPU runs batches serially."""
        ready: asyncio.Queue[LoadedBatch | None] = asyncio.Queue()
        room = [asyncio.Semaphore(self.config.drain_prefetch) for _ in range(self.config.drain_loaders)]
        loaders = [asyncio.create_task(self._loader(job_id, i, ready, room[i])) for i in range(self.config.drain_loaders)]
        finished = 0
        did_work = False
        try:
            await asyncio.get_running_loop().run_in_executor(self._slot, self.model.load, pipeline)
            while finished < len(loaders):
                batch = await ready.get()
                if batch is None:
                    finished += 1
                    continue
                room[batch.loader].release()
                did_work = True
                await self._run_batch(pipeline, batch)
        finally:
            for loader in loaders:
                loader.cancel()
            await asyncio.gather(*loaders, return_exceptions=True)
        return did_work

    async def _loader(self, job_id: int, index: int, ready: asyncio.Queue[LoadedBatch | None], room: asyncio.Semaphore) -> None:
        try:
            while not self._stop.is_set():
                await room.acquire()
                try:
                    tasks = await self.client.reserve_tasks(job_id, self.config.drain_batch_size)
                except Exception as exc:  # noqa: BLE001 - upstream: fetch failed -> this loader stops
                    log.error("drain worker %s loader %d: fetch failed (%s), stopping", self.name, index, exc)
                    break
                if not tasks:
                    break
                reserved_at = time.monotonic()
                self.ledger.reserved(job_id, len(tasks), sum(1 for t in tasks if _delivery(t) > 1))
                images = await asyncio.gather(*(self._load(t) for t in tasks))
                await ready.put(LoadedBatch(job_id, tasks, list(images), reserved_at, index))
        finally:
            await ready.put(None)

    async def _load(self, task: PipelineProcessingTask) -> Any:
        try:
            return await self.loader.load(task.image_url, self._prepare, self._decode)
        except ImageError as exc:
            return exc

    async def _run_batch(self, pipeline: str, batch: LoadedBatch) -> None:
        loop = asyncio.get_running_loop()
        ok = [(t, img) for t, img in zip(batch.tasks, batch.images) if not isinstance(img, Exception)]
        failed = [(t, img) for t, img in zip(batch.tasks, batch.images) if isinstance(img, Exception)]
        started = time.monotonic()
        results: list[TaskResult] = []
        if ok:
            try:
                outputs = await loop.run_in_executor(
                    self._slot, self.model.predict, pipeline, [ImageInput(t, img) for t, img in ok]
                )
                results += [TaskResult(reply_subject=t.reply_subject or "", result=o) for (t, _), o in zip(ok, outputs)]
            except Exception as exc:  # noqa: BLE001 - upstream: the whole batch gets error results
                log.error("drain worker %s: batch failed: %s", self.name, exc)
                results += [TaskResult(reply_subject=t.reply_subject or "",
                                       result=PipelineResultsError(error=str(exc), image_id=t.image_id)) for t, _ in ok]
        seconds = time.monotonic() - started
        results += [TaskResult(reply_subject=t.reply_subject or "",
                               result=PipelineResultsError(error=str(e), image_id=t.image_id)) for t, e in failed]
        idle = started - batch.reserved_at
        self.ledger.batch({batch.job_id: seconds}, {batch.job_id: len(batch.tasks)}, {batch.job_id: idle})
        self._metrics.write(pipeline, seconds, {batch.job_id: len(batch.tasks)}, idle)
        await self._post_sem.acquire()
        task = asyncio.create_task(self._post(batch.job_id, results, len(ok), len(failed)))
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)

    async def _post(self, job_id: int, results: list[TaskResult], ok: int, errors: int) -> None:
        try:
            async with self._posters:
                await self.client.post_results(job_id, results)
            self.ledger.posted(job_id, ok, errors)
        except Exception as exc:  # noqa: BLE001 - upstream: POSTs are never retried
            log.error("drain worker %s: posting %d results for job %s failed: %s", self.name, len(results), job_id, exc)
        finally:
            self._post_sem.release()


def _delivery(task: PipelineProcessingTask) -> int:
    info = parse_ack_subject(task.reply_subject or "")
    return info.num_delivered if info else 1



def run_drain_worker(settings: WorkerSettings, orchestration: str, drain: DrainSettings) -> dict[str, Any]:
    """One drain worker process (the bench's baseline), under Prefect or plain asyncio."""
    import asyncio
    import os

    if orchestration == "prefect":
        from antenna_flows.orchestration.server import prefect_api
        from antenna_flows.runner import flow_overrides
        from antenna_lab.bench.drain_flow import drain_worker

        os.environ["AMI_ANTENNA_API_TOKEN"] = settings.antenna_api_token
        with prefect_api():  # as the fair worker: no PREFECT_API_URL, a temporary server that outlives the run
            return asyncio.run(drain_worker(worker_name=settings.worker_name,
                                            settings_overrides=flow_overrides(settings)))
    from antenna_flows.models import load_model

    return asyncio.run(DrainWorker(settings, load_model(settings), drain).run())
