"""Fair scheduler: pure logic under a fake clock (no I/O, no Prefect)."""

from __future__ import annotations

import pytest

from antenna_flows.scheduler import CostModel, FairScheduler, reservation_cap


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


PER_IMAGE = 0.05
PER_BATCH = 0.02


def batch_seconds(n: int) -> float:
    return PER_BATCH + n * PER_IMAGE


def run(sched: FairScheduler, clock: FakeClock, backlog: dict[int, int], batches: int, max_batch: int = 8,
        arrivals: dict[int, tuple[int, str, int, float, int]] | None = None, cost: CostModel | None = None):
    """Drive the scheduler like the worker does: plan -> reserve -> select -> run -> charge.

    ``backlog``: images left per job (the "NATS" side). Returns per-batch job counts.
    """
    cost = cost or CostModel(default_s=PER_IMAGE)
    pool: dict[int, int] = {}
    history = []
    arrivals = dict(arrivals or {})
    for b in range(batches):
        for job_id, (at, pipeline, priority, weight, n) in list(arrivals.items()):
            if b >= at:
                backlog[job_id] = n
                sched.add(job_id, pipeline, priority, weight)
                del arrivals[job_id]
        for _ in range(len(sched.jobs) + 1):  # re-plan after a job came up dry, as the worker does
            wants = sched.plan_reservations(pool, max_batch, cost.per_image)
            short = False
            for job_id, n in wants.items():
                got = min(n, backlog.get(job_id, 0))
                backlog[job_id] = backlog.get(job_id, 0) - got
                if got:
                    pool[job_id] = pool.get(job_id, 0) + got
                    sched.mark_wet(job_id)
                if got < n:
                    sched.mark_dry(job_id)
                    short = True
            if not short:
                break
        pipeline, counts = sched.select_batch(pool, max_batch, cost.per_image)
        if not counts:
            clock.advance(0.1)
            history.append({})
            continue
        for job_id, n in counts.items():
            pool[job_id] -= n
        ticket = sched.start_batch(pipeline, counts, cost.per_image)
        seconds = batch_seconds(sum(counts.values()))
        clock.advance(seconds)
        sched.finish_batch(ticket, seconds)
        cost.observe(pipeline, sum(counts.values()), seconds)
        history.append(counts)
    return history


def make(jobs: dict[int, tuple[str, int, float]]):
    clock = FakeClock()
    sched = FairScheduler(clock=clock)
    for job_id, (pipeline, priority, weight) in jobs.items():
        sched.add(job_id, pipeline, priority, weight)
    return clock, sched


def test_equal_shares_within_one_quantum_over_a_long_run():
    clock, sched = make({1: ("p", 0, 1.0), 2: ("p", 0, 1.0), 3: ("p", 0, 1.0)})
    run(sched, clock, {1: 10**6, 2: 10**6, 3: 10**6}, batches=600)
    charged = [sched.jobs[j].charged_s for j in (1, 2, 3)]
    target = sum(charged) / 3
    quantum = batch_seconds(8)
    for c in charged:
        assert abs(c - target) <= quantum, (charged, target)


def test_weights_are_honoured():
    clock, sched = make({1: ("p", 0, 1.0), 2: ("p", 0, 2.0), 3: ("p", 0, 3.0)})
    run(sched, clock, {1: 10**6, 2: 10**6, 3: 10**6}, batches=600)
    total = sum(j.charged_s for j in sched.jobs.values())
    quantum = batch_seconds(8)
    for job_id, weight in ((1, 1), (2, 2), (3, 3)):
        assert abs(sched.jobs[job_id].charged_s - total * weight / 6) <= quantum


def test_no_starvation_one_huge_and_many_tiny_jobs():
    clock, sched = make({0: ("p", 0, 1.0)})
    backlog = {0: 10**6}
    arrivals = {100 + i: (5 * i, "p", 0, 1.0, 3) for i in range(40)}  # a tiny job every 5 batches
    history = run(sched, clock, backlog, batches=220, arrivals=arrivals)
    # every tiny job completes within 2 batches of arriving
    for i in range(40):
        job_id, at = 100 + i, 5 * i
        served = sum(h.get(job_id, 0) for h in history[at : at + 2])
        assert served == 3, (job_id, history[at : at + 3])
    # and the huge job keeps getting most of the slot (never starved)
    assert all(h.get(0, 0) >= 4 for h in history), [h for h in history if h.get(0, 0) < 4][:3]


def test_priority_job_goes_into_the_next_batch():
    clock, sched = make({1: ("p", 0, 1.0), 2: ("p", 0, 1.0)})
    backlog = {1: 10**6, 2: 10**6}
    history = run(sched, clock, backlog, batches=50, arrivals={9: (20, "p", 10, 1.0, 1)})
    assert history[20].get(9) == 1
    assert all(9 not in h for h in history[21:])


def test_priority_tier_is_strict_over_fairness():
    clock, sched = make({1: ("p", 0, 1.0), 2: ("p", 5, 1.0)})
    history = run(sched, clock, {1: 10**6, 2: 40}, batches=10)
    # the high tier takes whole batches until it has nothing left: 40 images = 5 batches
    assert [h.get(2, 0) for h in history[:5]] == [8] * 5
    assert all(h.get(1, 0) == 8 for h in history[5:])


def test_new_job_joins_at_virtual_time_and_does_not_monopolise():
    clock, sched = make({1: ("p", 0, 1.0)})
    history = run(sched, clock, {1: 10**6}, batches=100, arrivals={2: (50, "p", 0, 1.0, 10**6)})
    after = history[50:]
    late = sum(h.get(2, 0) for h in after)
    early = sum(h.get(1, 0) for h in after)
    assert abs(late - early) <= 8, (late, early)


def test_batches_hold_several_jobs_but_one_pipeline():
    clock, sched = make({1: ("a", 0, 1.0), 2: ("a", 0, 1.0), 3: ("b", 0, 1.0)})
    history = run(sched, clock, {1: 10**6, 2: 10**6, 3: 10**6}, batches=90)
    pipelines = {1: "a", 2: "a", 3: "b"}
    for h in history:
        assert len({pipelines[j] for j in h}) == 1
    assert any(len(h) == 2 for h in history)  # cross-job batch of pipeline a
    # pipeline b (one job) gets a third of the slot, like each job of pipeline a
    charged = {j: sched.jobs[j].charged_s for j in (1, 2, 3)}
    total = sum(charged.values())
    for c in charged.values():
        assert abs(c - total / 3) <= 2 * batch_seconds(8)


def test_dry_backoff_doubles_and_resets():
    clock, sched = make({1: ("p", 0, 1.0)})
    sched.mark_dry(1)
    assert not sched.eligible(1)
    clock.advance(0.1)
    assert sched.eligible(1)
    sched.mark_dry(1)
    clock.advance(0.15)
    assert not sched.eligible(1)
    clock.advance(0.06)
    assert sched.eligible(1)
    for _ in range(10):
        sched.mark_dry(1)
    clock.advance(1.9)
    assert not sched.eligible(1)  # capped at 2 s
    clock.advance(0.2)
    assert sched.eligible(1)
    assert sched.dry_for(1) == pytest.approx(0.1 + 0.15 + 0.06 + 2.1)
    sched.poke(1)
    assert sched.eligible(1)
    sched.mark_wet(1)
    assert sched.dry_for(1) == 0


def test_dry_job_rejoins_at_virtual_time():
    clock, sched = make({1: ("p", 0, 1.0), 2: ("p", 0, 1.0)})
    sched.mark_dry(2)
    backlog = {1: 10**6, 2: 0}
    run(sched, clock, backlog, batches=30)
    assert sched.jobs[1].vtime > 5
    backlog[2] = 10**6
    sched.poke(2)
    history = run(sched, clock, backlog, batches=20)
    # no catch-up burst: job 2 gets about half, not everything
    assert sum(h.get(2, 0) for h in history) <= 20 * 4 + 8


def test_plan_counts_what_is_already_reserved():
    clock, sched = make({1: ("p", 0, 1.0), 2: ("p", 0, 1.0)})
    assert sched.plan_reservations({}, 8, lambda p: 1.0) == {1: 4, 2: 4}
    assert sched.plan_reservations({1: 4}, 8, lambda p: 1.0) == {2: 4}
    assert sched.plan_reservations({1: 4, 2: 4}, 8, lambda p: 1.0) == {}
    sched.mark_dry(2)
    assert sched.plan_reservations({}, 8, lambda p: 1.0) == {1: 8}


def test_remove_and_weight_validation():
    clock, sched = make({1: ("p", 0, 1.0)})
    with pytest.raises(ValueError):
        sched.add(2, "p", weight=0)
    sched.remove(1)
    assert 1 not in sched
    assert sched.select_batch({1: 3}, 8, lambda p: 1.0) == (None, {})


def test_reservation_cap():
    assert reservation_cap(ack_wait_s=4, fraction=0.5, seconds_per_image=0.05) == 40
    assert reservation_cap(ack_wait_s=4, fraction=0.5, seconds_per_image=0.05, busy_for_s=0.4) == 32
    assert reservation_cap(ack_wait_s=30, fraction=0.5, seconds_per_image=4.0) == 3
    assert reservation_cap(ack_wait_s=30, fraction=0.5, seconds_per_image=4.0, busy_for_s=14) == 0
    assert reservation_cap(ack_wait_s=2, fraction=0.5, seconds_per_image=4.0) == 0


def test_cost_model_ewma():
    cost = CostModel(default_s=1.0, alpha=0.5)
    assert cost.per_image("p") == 1.0
    cost.observe("p", 10, 1.0)
    assert cost.per_image("p") == pytest.approx(0.1)
    cost.observe("p", 10, 2.0)
    assert cost.per_image("p") == pytest.approx(0.15)
    cost.seed("p", 9.0)  # a seed never overrides a measurement
    assert cost.per_image("p") == pytest.approx(0.15)


def test_urgent_tasks_go_first_then_fair_order():
    clock, sched = make({1: ("p", 0, 1.0), 2: ("p", 0, 1.0), 3: ("p", 5, 1.0)})
    sched.jobs[1].vtime = 100.0  # job 1 has had far more than its share
    _, counts = sched.select_batch({1: 5, 2: 10, 3: 1}, 4, lambda p: 1.0, urgent={1: 3})
    assert counts == {1: 3, 3: 1}  # the urgent ones beat even the priority tier; then priority
    _, counts = sched.select_batch({1: 5, 2: 10}, 4, lambda p: 1.0)
    assert counts == {2: 4}

