"""Several inference slots per GPU: batches overlap, the budget counts slots, nothing is doubled."""

from __future__ import annotations

import threading

from antenna_flows.models.sim import SimModel
from antenna_flows.settings import WorkerSettings
from antenna_flows.worker import FairWorker
from antenna_flows.worker.base import JobInfo
from antenna_flows.worker.reserver import busy_for_s
from antenna_flows.worker.slot import RunningBatch
from tests.test_worker import PIPELINE, aadmin, all_answered, serve_until, settings_for  # noqa: F401 - aadmin is a fixture


class CountingSim(SimModel):
    """The sim model, remembering how many predictions ran at once."""

    def __init__(self, *args: float):
        super().__init__(*args)
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def predict(self, pipeline, images):  # type: ignore[no-untyped-def]
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            return super().predict(pipeline, images)
        finally:
            with self.lock:
                self.now -= 1


async def test_two_slots_run_batches_at_once_and_answer_every_image_once(stack, aadmin):
    job = stack.create_job(PIPELINE, 24, job_id=901)
    settings = settings_for(stack, slots=2, sim_seconds_per_image=0.03, max_batch_size=4)
    model = CountingSim(settings.sim_seconds_per_image, settings.sim_seconds_per_batch)
    worker = FairWorker(settings, model)
    await serve_until([worker], all_answered(aadmin, job.id))
    job = await aadmin.job(job.id)
    assert (job.results, job.duplicates, job.redeliveries) == (24, 0, 0)
    assert model.most == 2  # two batches were on the GPU at once
    assert worker.ledger.batches >= 6


def test_the_reservation_budget_counts_slots():
    now = [100.0]
    worker = FairWorker(WorkerSettings(model_kind="sim", slots=2, sim_seconds_per_image=0.1, sim_seconds_per_batch=0.0),
                        SimModel(0.1, 0.0), clock=lambda: now[0])
    worker.jobs[1] = JobInfo(1, PIPELINE, 0, 30.0, now[0])
    assert worker.per_image_s() == 0.05  # images start twice as often with two slots
    worker.running[0] = RunningBatch(PIPELINE, 8, started=now[0])
    assert busy_for_s(worker) == 0.0  # one slot is free: the next batch can start now
    worker.running[1] = RunningBatch(PIPELINE, 8, started=now[0] - 0.5)
    assert abs(busy_for_s(worker) - 0.3) < 1e-9  # the soonest slot frees in 0.8 - 0.5 s
