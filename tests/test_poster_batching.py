"""When the poster sends a job's answers (antenna_flows/worker/poster.py): which outboxes are due, on a fake clock."""

from __future__ import annotations

from typing import Any

from antenna_flows.worker.held import State, TaskStore
from antenna_flows.worker.poster import Poster, PostPolicy

from tests.helpers import Clock
from tests.test_held import held


def poster(store: TaskStore, clock: Clock, **kw: Any) -> Poster:
    none: Any = None  # the parts a due decision never touches (client, orchestrator, settler, ledger, pulse)
    return Poster("w", none, none, none, store, none, PostPolicy(post_batch=24, max_delay_s=1.0), none,
                  clock=clock, **kw)


def answered(store: TaskStore, p: Poster, job_id: int, n: int, start: int = 0) -> None:
    """``n`` of the job's tasks answered and handed to the outbox at the clock's time."""
    batch = []
    for i in range(start, start + n):
        h = held(job_id, f"img-{job_id}-{i}", seq=i + 1)
        store.add(h, State.READY)
        store.move(h, State.RUNNING)
        store.move(h, State.POSTING)
        batch.append(h)
    now = p.clock()
    for h in batch:
        h.posted_at = now
        p.outbox.setdefault(job_id, []).append(h)


def test_the_end_of_a_chunk_goes_at_once_unless_antenna_bound_with_more_of_the_job_to_come():
    clock = Clock()
    store = TaskStore()
    waits: dict[int, bool] = {}
    p = poster(store, clock, save_delay_s=lambda: 5.0, may_wait=lambda job_id: waits.get(job_id, False))
    answered(store, p, 1, 4)  # the last of job 1's chunk: nothing else of job 1 held
    answered(store, p, 2, 4)
    assert p._due() == [1, 2]  # GPU-bound: nothing can join them, they go at once
    waits.update({1: True, 2: False})  # Antenna-bound; job 1 has more to hand out, job 2 gave out its last
    assert p._due() == [2]  # a job's last answers never wait
    assert p.max_delay() == 2.5  # half of what its answers would wait in Antenna's queue anyway
    clock.t += 2.4
    assert p._due() == [2]
    answered(store, p, 1, 20, start=4)  # job 1's next chunk joins: a full post goes at once
    assert p._due() == [1, 2]


def test_answers_waiting_for_their_job_s_next_chunk_go_after_the_longest_delay():
    clock = Clock()
    store = TaskStore()
    p = poster(store, clock, save_delay_s=lambda: 5.0, may_wait=lambda job_id: True)
    answered(store, p, 1, 4)
    clock.t += 2.4
    assert p._due() == []
    clock.t += 0.1
    assert p._due() == [1]
