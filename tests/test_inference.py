"""Inference (antenna_flows/worker/inference.py), driven with the sim model and real reservations.

Tasks are reserved from a real nats-server and taken in by the real intake, whose loader
downloads their images from a local HTTP server; the inference part then runs them. A batch
is one pipeline, from any number of jobs, in fair order; a thin batch waits for images still
loading, but at most ``batch_fill_wait_s``; an image that fails to load, an image that fails
inference, and a pipeline the model does not know each become error results, and the rest of
the batch is answered.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace
from typing import Iterator

import pytest
from PIL import Image

from antenna_flows.accounting import BatchLog
from antenna_flows.imageloader import ImageLoader
from antenna_flows.models.sim import SimModel
from antenna_flows.scheduler import CostModel, FairScheduler
from antenna_flows.schemas import PipelineResultsError, PipelineResultsResponse
from antenna_flows.worker.base import Pulse
from antenna_flows.worker.held import HeldTask, State
from antenna_flows.worker.inference import Inference, InferencePolicy
from antenna_flows.worker.intake import Intake
from antenna_flows.worker.rotation import Rotation
from tests.helpers import serve_http
from tests.worker_parts import Bench, add_job, bench, tasks

P1, P2 = "sim-panama_moths_2024", "sim-uk_denmark_moths_2023"


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = _jpeg()


@pytest.fixture
def images() -> Iterator[SimpleNamespace]:
    """Images at ``{url}/ok/<n>.jpg``; ``/missing/`` answers 404; ``/held/`` waits until ``gate`` is set."""
    gate = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/missing/"):
                self.send_error(404)
                return
            if self.path.startswith("/held/"):
                gate.wait(10)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG)

        def log_message(self, *args: object) -> None:
            pass

    server = serve_http(Handler)
    url = next(server)
    yield SimpleNamespace(url=url, gate=gate)
    gate.set()
    server.close()


class Sim(SimModel):
    """The sim model, remembering each predict call's image ids; ``poison`` fails any batch holding it."""

    def __init__(self, seconds_per_image: float = 0.002, seconds_per_batch: float = 0.002, poison: str | None = None):
        super().__init__(seconds_per_image, seconds_per_batch)
        self.calls: list[list[str]] = []
        self.poison = poison

    def predict(self, pipeline, images):  # type: ignore[no-untyped-def]
        ids = [item.task.image_id for item in images]
        self.calls.append(ids)
        if self.poison in ids:
            raise RuntimeError(f"CUDA error on image {self.poison}")
        return super().predict(pipeline, images)


class Rig:
    """A bench's job(s) served by an intake and an inference part, over one store and ledger."""

    def __init__(self, b: Bench, model: Sim, policy: InferencePolicy, jobs: dict[int, str], loader: ImageLoader):
        self.b, self.model, self.loader = b, model, loader
        clock = time.monotonic
        self.scheduler = FairScheduler(clock=clock)
        self.rotation = Rotation(self.scheduler, b.ledger, CostModel(default_s=model.seconds_per_image), slots=policy.slots,
                                 reserve_fraction=0.5, max_batch_size=policy.max_batch_size, clock=clock)
        for job_id, pipeline in jobs.items():
            self.rotation.join(job_id, pipeline, 0, 30.0)
        self.pulse = Pulse()
        b.store.on_change = self.pulse.tasks.set
        self.batches: list[tuple[float, list[HeldTask]]] = []

        async def hand_over(batch: list[HeldTask]) -> None:
            self.batches.append((time.monotonic(), list(batch)))

        self.inference = Inference("t", model, b.store, self.rotation, self.scheduler, b.ledger, BatchLog(None, "t"),
                                   policy, self.pulse, hand_over=hand_over)

        async def repost(batch: list[HeldTask]) -> None:
            raise AssertionError("nothing here is a re-answer")

        self.intake = Intake("t", b.store, b.ledger, self.scheduler, loader, model, b.settler, repost=repost,
                             spawn=b.spawn, clock=clock)

    async def take(self, job_id: int, n: int) -> list[HeldTask]:
        reserved = await self.b.transport.reserve(job_id, n)
        assert len(reserved) == n
        self.intake.accept(job_id, reserved)
        return self.b.store.of_job(job_id)

    async def until(self, condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.01)

    def all_ready(self) -> bool:
        return all(h.state is State.READY for h in self.b.store.all())

    def stop(self) -> None:
        self.pulse.stopping.set()
        self.pulse.all_awake()

    def close(self) -> None:
        self.inference.close()
        for held in self.b.store.all():
            if held.image is not None:
                held.image.cancel()


async def rig(nats_url: str, images: SimpleNamespace, model: Sim, policy: InferencePolicy,
              jobs: list[tuple[str, list[str]]]) -> tuple[Rig, list[int]]:
    """Jobs given as (pipeline, image paths); returns the rig and the job ids, in order."""
    (pipeline, paths), *more = jobs
    b = await bench(nats_url, len(paths), ack_wait_s=30.0, task_list=_tasks(images.url, paths))
    ids = [b.job_id] + [await add_job(b, _tasks(images.url, p)) for _, p in more]
    r = Rig(b, model, policy, dict(zip(ids, [pipeline] + [p for p, _ in more])), ImageLoader(timeout_s=5.0))
    return r, ids


def _tasks(base: str, paths: list[str]):  # type: ignore[no-untyped-def]
    out = tasks(len(paths))
    for task, path in zip(out, paths):
        task.image_url = f"{base}/{path.format(task.image_id)}"
    return out


async def done(r: Rig, ids: list[int]) -> None:
    r.close()
    await r.loader.aclose()
    for job_id in ids[1:]:
        await r.b.streams.delete_job(job_id)
    await r.b.close()


def ok(n: int) -> list[str]:
    return ["ok/{}.jpg"] * n


async def test_a_batch_is_one_pipeline_from_several_jobs_in_fair_order(nats_server, images):
    policy = InferencePolicy(max_batch_size=4, session_idle_s=0.2)
    r, (a, b, c) = await rig(nats_server.url, images, Sim(), policy, [(P1, ok(4)), (P1, ok(4)), (P2, ok(4))])
    try:
        for job_id in (a, b, c):
            await r.take(job_id, 4)
        await r.until(r.all_ready)
        summary = await asyncio.wait_for(r.inference.session(), timeout=10)
        counts = [{j: sum(h.job_id == j for h in batch) for j in (a, b, c) if any(h.job_id == j for h in batch)}
                  for _, batch in r.batches]
        # a and b share a pipeline and the virtual time: they alternate in one batch; c's pipeline goes next,
        # being furthest behind; then a and b again
        assert counts == [{a: 2, b: 2}, {c: 4}, {a: 2, b: 2}]
        assert summary["batches"] == 3 and summary["jobs"] == sorted((a, b, c))
        for _, batch in r.batches:
            pipelines = {r.rotation.jobs[h.job_id].pipeline for h in batch}
            assert len(pipelines) == 1
            for held in batch:
                assert held.state is State.POSTING and isinstance(held.result, PipelineResultsResponse)
                assert held.result.pipeline in pipelines and held.result.source_images[0].id == held.r.image_id
        assert [len(ids) for ids in r.model.calls] == [4, 4, 4]
        ledger = r.b.ledger
        assert ledger.batches == 3 and (ledger.job(a).batches, ledger.job(c).batches) == (2, 1)
        assert ledger.job(a).slot_s > 0 and ledger.job(a).slot_s == pytest.approx(ledger.job(b).slot_s)  # equal shares
        assert ledger.job(a).slot_s + ledger.job(b).slot_s + ledger.job(c).slot_s == pytest.approx(ledger.slot_busy_s)
    finally:
        await done(r, [a, b, c])


async def test_busy_for_s_is_the_running_batchs_expected_rest_and_zero_once_a_slot_is_free(nats_server, images):
    model = Sim(seconds_per_image=0.1, seconds_per_batch=0.0)
    r, ids = await rig(nats_server.url, images, model, InferencePolicy(slots=1, max_batch_size=4), [(P1, ok(4))])
    try:
        batch = await r.take(ids[0], 4)
        await r.until(r.all_ready)
        assert r.inference.busy_for_s() == 0.0
        taken = r.b.store.take_ready(ids[0], 4)
        assert taken == batch
        running = asyncio.create_task(r.inference.run_batch(P1, {ids[0]: 4}, taken))
        await asyncio.sleep(0.1)
        busy = r.inference.busy_for_s()
        assert 0.1 < busy < 0.35  # 4 images of 0.1 s expected, ~0.1 s of them done
        await running
        assert r.inference.busy_for_s() == 0.0
        assert all(h.state is State.POSTING for h in taken)
    finally:
        await done(r, ids)


async def test_a_thin_batch_waits_at_most_batch_fill_wait_s(nats_server, images):
    policy = InferencePolicy(max_batch_size=4, batch_fill_wait_s=0.3)
    r, ids = await rig(nats_server.url, images, Sim(), policy, [(P1, ["ok/{}.jpg"] + ["held/{}.jpg"] * 3)])
    try:
        await r.take(ids[0], 4)
        await r.until(lambda: r.b.store.ready_counts())
        ready_at = time.monotonic()
        session = asyncio.create_task(r.inference.session())
        await r.until(lambda: r.batches)
        stop_at = time.monotonic()
        r.stop()
        await asyncio.wait_for(session, timeout=5)
        [(ran_at, batch)] = r.batches
        assert [h.r.image_id for h in batch] == ["1"]  # the three still loading were not waited for longer
        assert 0.25 <= ran_at - ready_at < 1.0
        assert stop_at - ready_at < 1.0
        assert sorted(h.state.value for h in r.b.store.all()) == ["loading", "loading", "loading", "posting"]
    finally:
        await done(r, ids)


async def test_a_thin_batch_is_filled_by_images_that_load_within_the_wait(nats_server, images):
    policy = InferencePolicy(max_batch_size=4, batch_fill_wait_s=3.0, session_idle_s=0.1)
    r, ids = await rig(nats_server.url, images, Sim(), policy, [(P1, ["ok/{}.jpg"] + ["held/{}.jpg"] * 3)])
    try:
        await r.take(ids[0], 4)
        await r.until(lambda: r.b.store.ready_counts())
        ready_at = time.monotonic()
        session = asyncio.create_task(r.inference.session())
        await asyncio.sleep(0.2)
        assert r.batches == []  # one image ready, three loading: waiting for a fuller batch
        images.gate.set()
        await asyncio.wait_for(session, timeout=5)
        [(ran_at, batch)] = r.batches
        assert sorted(h.r.image_id for h in batch) == ["1", "2", "3", "4"]
        assert ran_at - ready_at < 2.0  # ran once they had loaded, not at the end of the wait
    finally:
        await done(r, ids)


async def test_an_image_that_fails_to_load_is_an_error_result_and_the_rest_of_the_batch_runs(nats_server, images):
    policy = InferencePolicy(max_batch_size=4, session_idle_s=0.1)
    r, ids = await rig(nats_server.url, images, Sim(), policy, [(P1, ["ok/{}.jpg", "missing/{}.jpg", "ok/{}.jpg"])])
    try:
        await r.take(ids[0], 3)
        await r.until(r.all_ready)
        await asyncio.wait_for(r.inference.session(), timeout=5)
        [(_, batch)] = r.batches
        results = {h.r.image_id: h.result for h in batch}
        assert isinstance(results["2"], PipelineResultsError) and results["2"].image_id == "2"
        assert "404" in results["2"].error
        assert all(isinstance(results[i], PipelineResultsResponse) for i in ("1", "3"))
        assert r.model.calls == [["1", "3"]]  # the model saw only the images that loaded
        assert all(h.state is State.POSTING for h in batch)
    finally:
        await done(r, ids)


async def test_a_batch_that_fails_as_a_whole_is_retried_image_by_image(nats_server, images):
    policy = InferencePolicy(max_batch_size=4, session_idle_s=0.1)
    r, ids = await rig(nats_server.url, images, Sim(poison="3"), policy, [(P1, ok(4))])
    try:
        await r.take(ids[0], 4)
        await r.until(r.all_ready)
        await asyncio.wait_for(r.inference.session(), timeout=5)
        [(_, batch)] = r.batches
        assert r.model.calls == [["1", "2", "3", "4"], ["1"], ["2"], ["3"], ["4"]]
        results = {h.r.image_id: h.result for h in batch}
        assert isinstance(results["3"], PipelineResultsError) and results["3"].image_id == "3"
        assert "inference failed" in results["3"].error and "CUDA error" in results["3"].error
        assert all(isinstance(results[i], PipelineResultsResponse) for i in ("1", "2", "4"))
    finally:
        await done(r, ids)


async def test_an_unknown_pipeline_gives_error_results_and_the_model_runs_nothing(nats_server, images):
    policy = InferencePolicy(max_batch_size=4, session_idle_s=0.1)
    real = "panama_moths_2024"  # a real pipeline: the sim model refuses it
    r, ids = await rig(nats_server.url, images, Sim(), policy, [(real, ok(3))])
    try:
        await r.take(ids[0], 3)
        await r.until(r.all_ready)
        await asyncio.wait_for(r.inference.session(), timeout=5)
        [(_, batch)] = r.batches
        assert r.model.calls == [] and real not in r.inference.loaded
        for held in batch:
            assert isinstance(held.result, PipelineResultsError) and held.result.image_id == held.r.image_id
            assert "unknown pipeline" in held.result.error and held.state is State.POSTING
        assert r.b.ledger.batches == 1  # answered (with errors), so the job can complete
    finally:
        await done(r, ids)
