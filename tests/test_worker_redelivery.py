"""Redeliveries reaching a worker: answered once, acked for every delivery.

Worker logic on in-memory reservations, with a recording transport standing in
for the queue (the end-to-end paths run against real NATS in test_worker.py).
"""

from __future__ import annotations

import asyncio

from antenna_flows.imageloader import ImageLoader
from antenna_flows.jetstream import Reservation
from antenna_flows.models.sim import SimModel
from antenna_flows.schemas import PipelineProcessingTask
from antenna_flows.settings import WorkerSettings
from antenna_flows.worker import FairWorker


class RecordingTransport:
    """Remembers what the worker did with each reservation."""

    name = "recording"
    can_extend = True

    def __init__(self) -> None:
        self.acked: list[str] = []

    async def ack(self, r: Reservation) -> None:
        self.acked.append(r.reply_subject)


def reservation(image_id: str, delivery: int, seq: int) -> Reservation:
    task = PipelineProcessingTask(id=image_id, image_id=image_id, image_url=f"http://127.0.0.1:9/{image_id}.jpg")
    reply = f"$JS.ACK.job_7.job-7-consumer.{delivery}.{seq}.{seq + delivery}.1700000000000000000.0"
    return Reservation(job_id=7, task=task, parse_error=None, reply_subject=reply)


def worker() -> FairWorker:
    w = FairWorker(WorkerSettings(model_kind="sim", worker_name="t"), SimModel(), transport=RecordingTransport())
    w.loader = ImageLoader(timeout_s=1.0)  # nothing listens on port 9: loads fail fast, as a missing image would
    return w


async def test_redelivery_of_an_answered_image_is_acked_not_reprocessed():
    w = worker()
    w.answered[(7, "42")] = None  # this worker already posted image 42 and Antenna accepted it
    w._accept(7, [reservation("42", delivery=2, seq=3)])
    await asyncio.sleep(0)  # the ack is sent in the background
    assert not w.pool.get(7)  # nothing queued for inference
    assert w.transport.acked == ["$JS.ACK.job_7.job-7-consumer.2.3.5.1700000000000000000.0"]
    assert w.ledger.job(7).duplicates_skipped == 1
    assert w.ledger.job(7).redelivered == 1


async def test_second_delivery_while_held_joins_the_first_and_is_answered_with_it():
    w = worker()
    w._accept(7, [reservation("42", delivery=1, seq=3)])
    held = w.pool[7][0]
    w._accept(7, [reservation("42", delivery=2, seq=3)])
    assert len(w.pool[7]) == 1  # one inference for both deliveries
    assert [r.num_delivered for r in held.reservations()] == [1, 2]
    await w._acked(7, [(held, object())])
    assert len(w.transport.acked) == 2  # every delivery acked once the result is accepted
    assert (7, "42") in w.answered
    await w.loader.aclose()
