"""Redeliveries reaching a worker: the store's bookkeeping, with a recording transport.

Worker logic on in-memory reservations (the end-to-end paths run against real
NATS and the Antenna-like local API in test_worker.py). The rule under test:
the worker never acks; a redelivery of an answered image means Antenna's save
did not happen, so it is answered again.
"""

from __future__ import annotations

import asyncio

from antenna_flows.imageloader import ImageLoader
from antenna_flows.jetstream import Reservation
from antenna_flows.models.sim import SimModel
from antenna_flows.schemas import PipelineProcessingTask, PipelineResultsError
from antenna_flows.settings import WorkerSettings
from antenna_flows.worker import FairWorker
from antenna_flows.worker.held import HeldTask, State
from antenna_flows.worker.reserver import accept
from antenna_flows.worker.settle import PostDecision, Settler, post_outcome
from antenna_flows.antenna_client import AuthError, Rejected, Unavailable


class RecordingTransport:
    """Remembers what the worker did with each reservation (it has no ack: the worker cannot ack)."""

    name = "recording"
    can_extend = True
    announces_jobs = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def in_progress(self, r: Reservation) -> None:
        self.calls.append(("wpi", r.reply_subject))

    async def nak(self, r: Reservation, delay_s: float) -> None:
        self.calls.append(("nak", r.reply_subject))

    async def term(self, r: Reservation) -> None:
        self.calls.append(("term", r.reply_subject))


def reservation(image_id: str, delivery: int, seq: int) -> Reservation:
    task = PipelineProcessingTask(id=image_id, image_id=image_id, image_url=f"http://127.0.0.1:9/{image_id}.jpg")
    reply = f"$JS.ACK.job_7.job-7-consumer.{delivery}.{seq}.{seq + delivery}.1700000000000000000.0"
    return Reservation(job_id=7, task=task, parse_error=None, reply_subject=reply)


def worker() -> FairWorker:
    w = FairWorker(WorkerSettings(model_kind="sim", worker_name="t"), SimModel(), transport=RecordingTransport())
    w.loader = ImageLoader(timeout_s=1.0)  # nothing listens on port 9: loads fail fast, as a missing image would
    w.settler = Settler("t", w.store, w.ledger, w.transport, release_delay_s=0.01)
    return w


async def answer(w: FairWorker, held: HeldTask) -> None:
    held.result = PipelineResultsError(error="x", image_id=held.r.image_id)
    held.state = State.POSTING
    await w.settler.settle([held], State.ANSWERED)


async def test_an_answered_task_is_never_acked_and_gets_one_last_heartbeat():
    w = worker()
    accept(w, 7, [reservation("42", delivery=1, seq=3)])
    [held] = w.store.all()
    await answer(w, held)
    assert w.transport.calls == [("wpi", held.r.reply_subject)]  # Antenna gets a full ack_wait to save
    assert len(w.store) == 0 and w.store.answered((7, "42"))
    await w.loader.aclose()


async def test_redelivery_of_an_answered_image_is_answered_again_from_the_kept_answer(monkeypatch):
    w = worker()
    accept(w, 7, [reservation("42", delivery=1, seq=3)])
    [first] = w.store.all()
    await answer(w, first)
    posted: list[list[HeldTask]] = []
    monkeypatch.setattr("antenna_flows.worker.poster.post_in_background", lambda _w, tasks: posted.append(tasks))
    accept(w, 7, [reservation("42", delivery=2, seq=3)])  # Antenna's save failed: NATS redelivers
    [[again]] = posted
    assert again.reanswer and again.state is State.POSTING and again.result == first.result
    assert again.r.num_delivered == 2 and again.image is None  # no download, no inference
    await w.settler.settle([again], State.ANSWERED)
    assert w.ledger.job(7).reanswered == 1 and w.ledger.job(7).recomputed == 0
    assert w.ledger.job(7).redelivered == 1
    await w.loader.aclose()


async def test_redelivery_of_an_answer_no_longer_kept_is_recomputed():
    w = worker()
    w.store.answers_kept = 0
    accept(w, 7, [reservation("42", delivery=1, seq=3)])
    [first] = w.store.all()
    await answer(w, first)
    accept(w, 7, [reservation("42", delivery=2, seq=3)])
    [again] = w.store.all()
    assert again.reanswer and again.state is State.LOADING  # loading its image again: computed anew
    assert w.ledger.job(7).recomputed == 1
    again.image.cancel()
    await w.loader.aclose()


async def test_second_delivery_while_held_joins_the_first_and_is_answered_on_the_latest_subject():
    w = worker()
    accept(w, 7, [reservation("42", delivery=1, seq=3)])
    [held] = w.store.all()
    accept(w, 7, [reservation("42", delivery=2, seq=3)])
    assert len(w.store) == 1  # one inference for both deliveries
    assert [r.num_delivered for r in held.reservations()] == [1, 2]
    assert held.reply_subjects() == [held.twins[0].reply_subject]  # one message: answered once, latest delivery
    held.image.cancel()
    await w.loader.aclose()


async def test_stop_releases_waiting_tasks_with_nak():
    w = worker()
    accept(w, 7, [reservation("1", 1, 1), reservation("2", 1, 2)])
    released = await w.settler.settle(w.store.all(State.RESERVED, State.LOADING, State.READY), State.RELEASED, "stop")
    assert released == 2 and len(w.store) == 0
    assert [c for c, _ in w.transport.calls] == ["nak", "nak"]
    assert w.ledger.job(7).released == 2
    await w.loader.aclose()


def test_what_a_post_error_means_for_its_tasks():
    assert post_outcome(None) is PostDecision.ANSWERED
    assert post_outcome(Unavailable("503")) is PostDecision.RELEASE  # the retries were spent
    assert post_outcome(AuthError("401")) is PostDecision.FATAL
    assert post_outcome(Rejected(404, "gone", "POST /x")) is PostDecision.DROP
    assert post_outcome(Rejected(400, "bad", "POST /x")) is PostDecision.ISOLATE
    assert post_outcome(asyncio.TimeoutError()) is PostDecision.RELEASE


def test_discovery_polls_start_at_a_random_phase_then_keep_the_mean_interval():
    import random
    from itertools import islice

    from antenna_flows.worker.discovery import poll_waits

    phases = [next(poll_waits(4.0, random.Random(name))) for name in ("w0", "w1", "w2", "w3")]
    assert all(0.0 <= p < 4.0 for p in phases) and len(set(phases)) == 4  # a fleet does not poll in lock-step
    later = list(islice(poll_waits(4.0, random.Random(1)), 1, 2001))
    assert all(3.0 <= x <= 5.0 for x in later)
    assert abs(sum(later) / len(later) - 4.0) < 0.05  # the mean request rate stays 1 / interval
