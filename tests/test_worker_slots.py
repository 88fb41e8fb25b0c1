"""Several inference slots per GPU: batches overlap, the budget counts slots, nothing is doubled."""

from __future__ import annotations

import threading

from antenna_flows.models.sim import SimModel
from antenna_flows.settings import WorkerSettings
from antenna_flows.worker import FairWorker
from antenna_flows.worker.inference import RunningBatch
from tests.helpers import PIPELINE, all_answered, serve_until, settings_for


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
    from antenna_flows.accounting import BatchLog
    from antenna_flows.worker.base import Pulse
    from antenna_flows.worker.inference import Inference, InferencePolicy

    now = [100.0]
    worker = FairWorker(WorkerSettings(model_kind="sim", slots=2, sim_seconds_per_image=0.1, sim_seconds_per_batch=0.0),
                        SimModel(0.1, 0.0), clock=lambda: now[0])
    worker.rotation.join(1, PIPELINE, 0, 30.0)
    assert worker.rotation.per_image_s() == 0.05  # images start twice as often with two slots
    inference = Inference("t", worker.model, worker.store, worker.rotation, worker.scheduler, worker.ledger,
                          BatchLog(None, "t"), InferencePolicy(slots=2), Pulse(), hand_over=None)  # type: ignore[arg-type]
    inference.running[0] = RunningBatch(PIPELINE, 8, started=now[0])
    assert inference.busy_for_s() == 0.0  # one slot is free: the next batch can start now
    inference.running[1] = RunningBatch(PIPELINE, 8, started=now[0] - 0.5)
    assert abs(inference.busy_for_s() - 0.3) < 1e-9  # the soonest slot frees in 0.8 - 0.5 s
    inference.close()
