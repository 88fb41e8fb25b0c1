"""The held-task store (antenna_flows/worker/held.py): one state per task, changed only by legal moves."""

from __future__ import annotations

import pytest

from antenna_flows.jetstream import Reservation
from antenna_flows.schemas import PipelineProcessingTask, PipelineResultsError
from antenna_flows.worker.held import BadMove, HeldTask, State, TaskStore


def held(job_id: int, image_id: str, seq: int = 1, delivery: int = 1) -> HeldTask:
    task = PipelineProcessingTask(id=image_id, image_id=image_id, image_url=f"http://x/{image_id}.jpg")
    reply = f"$JS.ACK.job_{job_id}.job-{job_id}-consumer.{delivery}.{seq}.{seq}.1700000000000000000.0"
    return HeldTask(Reservation(job_id=job_id, task=task, parse_error=None, reply_subject=reply))


def test_a_task_walks_the_diagram_and_nothing_else():
    changes: list[int] = []
    store = TaskStore(on_change=lambda: changes.append(1))
    h = held(1, "a")
    store.add(h)
    assert h.state is State.RESERVED and store.waiting_counts() == {1: 1}
    for state in (State.LOADING, State.READY, State.RUNNING, State.POSTING):
        store.move(h, state)
    assert store.waiting_counts() == {} and store.counts(State.POSTING) == {1: 1}
    with pytest.raises(BadMove):
        store.move(h, State.READY)  # no way back
    with pytest.raises(BadMove):
        store.move(h, State.ANSWERED)  # endings are settle's
    h.result = PipelineResultsError(error="x", image_id="a")
    store.settle(h, State.ANSWERED)
    assert len(store) == 0 and store.answered((1, "a")) and store.answer_of((1, "a")) is h.result
    with pytest.raises(BadMove):
        store.settle(h, State.RELEASED)  # a task ends once
    assert len(changes) == 6  # add, four moves, settle: every change wakes the parts


def test_entering_settled_or_skipping_states_is_refused():
    store = TaskStore()
    with pytest.raises(BadMove):
        store.add(held(1, "a"), State.ANSWERED)
    h = held(1, "b")
    store.add(h)
    with pytest.raises(BadMove):
        store.move(h, State.RUNNING)  # a batch only takes READY tasks


def test_take_ready_takes_the_oldest_of_a_job_and_answers_are_kept_bounded():
    store = TaskStore(answers_kept=2)
    tasks = [held(1, str(i), seq=i) for i in range(5)]
    for h in tasks:
        store.add(h, State.READY)
    store.add(held(2, "x"), State.READY)
    taken = store.take_ready(1, 3)
    assert taken == tasks[:3] and all(h.state is State.RUNNING for h in taken)
    assert store.ready_counts() == {1: 2, 2: 1}
    for h in taken:
        store.move(h, State.POSTING)
        h.result = PipelineResultsError(error="x", image_id=h.r.image_id)
        store.settle(h, State.ANSWERED)
    assert store.answer_of((1, "0")) is None and store.answer_of((1, "2")) is not None  # only the last 2 kept
    assert store.answered((1, "0"))  # but remembered as answered (a redelivery is recomputed, counted)


def test_twins_are_answered_once_per_message_on_its_latest_delivery():
    h = held(1, "a", seq=3, delivery=1)
    h.twins.append(held(1, "a", seq=3, delivery=2).r)
    h.twins.append(held(1, "a", seq=9, delivery=1).r)  # the same image published twice: two messages
    subjects = h.reply_subjects()
    assert len(subjects) == 2 and h.twins[0].reply_subject in subjects and h.twins[1].reply_subject in subjects
