"""The rotation (antenna_flows/worker/rotation.py): who is served, and the timing every part derives from it.

Pure state on a fake clock: joining and leaving keep the fair scheduler and the ledger in
step with the rotation; ack_wait is a job's own, or the shortest served; the reservation
window, the seconds between image starts (which count the slots) and the batch limit
follow from them.
"""

from __future__ import annotations

import pytest

from antenna_flows.accounting import Ledger
from antenna_flows.scheduler import CostModel, FairScheduler
from antenna_flows.worker.rotation import DEFAULT_ACK_WAIT_S, Rotation

FAST, SLOW = "sim-panama_moths_2024", "sim-global_moths_2024"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def rotation(*, slots: int = 1, reserve_fraction: float = 0.5, max_batch_size: int = 8,
             costs: dict[str, float] | None = None, clock: Clock | None = None) -> Rotation:
    clock = clock or Clock()
    return Rotation(FairScheduler(clock=clock), Ledger(worker="t", clock=clock),
                    CostModel(default_s=1.0, initial=costs or {FAST: 0.1, SLOW: 0.4}), slots=slots,
                    reserve_fraction=reserve_fraction, max_batch_size=max_batch_size, clock=clock)


def test_join_puts_the_job_in_the_rotation_the_scheduler_and_the_ledger():
    clock = Clock(50.0)
    rot = rotation(clock=clock)
    info = rot.join(7, FAST, 2, 30.0)
    assert (info.job_id, info.pipeline, info.priority, info.ack_wait_s, info.last_listed) == (7, FAST, 2, 30.0, 50.0)
    assert 7 in rot and len(rot) == 1 and rot.ids() == [7] and list(rot) == [7]
    entry = rot.scheduler.jobs[7]
    assert (entry.pipeline, entry.priority) == (FAST, 2)
    row = rot.ledger.jobs[7]
    assert (row.pipeline, row.priority) == (FAST, 2)


def test_leave_takes_the_job_out_of_the_scheduler_and_keeps_its_ledger_row():
    rot = rotation()
    rot.join(7, FAST, 0, 30.0)
    rot.join(8, SLOW, 0, 60.0)
    rot.ledger.posted(7, 3, 1)
    left = rot.leave(7)
    assert left is not None and left.job_id == 7
    assert 7 not in rot and 7 not in rot.scheduler and rot.ids() == [8] and list(rot.scheduler.jobs) == [8]
    assert rot.ledger.jobs[7].images == 3  # the run's table still lists every job it has seen
    assert rot.leave(7) is None and rot.leave(12345) is None  # leaving twice, or unknown: nothing happens
    assert rot.ids() == [8]


def test_a_job_that_rejoins_is_served_again_at_the_current_virtual_time():
    rot = rotation()
    rot.join(7, FAST, 0, 30.0)
    rot.join(8, FAST, 0, 30.0)
    ticket = rot.scheduler.start_batch(FAST, {8: 4}, rot.cost.per_image)
    rot.scheduler.finish_batch(ticket, 0.4)
    rot.leave(7)
    rot.join(7, FAST, 0, 30.0)
    assert rot.scheduler.jobs[7].vtime == pytest.approx(rot.scheduler.jobs[8].vtime)  # no credit banked while away
    assert rot.ids() == [7, 8]


def test_listed_again_records_when_and_a_new_priority_reaches_the_scheduler():
    clock = Clock(10.0)
    rot = rotation(clock=clock)
    rot.join(7, FAST, 0, 30.0)
    clock.t = 25.0
    rot.listed(7, 0)
    assert rot.jobs[7].last_listed == 25.0
    rot.listed(7, 5)
    assert rot.jobs[7].priority == 5 and rot.scheduler.jobs[7].priority == 5
    assert rot.scheduler.jobs[7].pipeline == FAST


def test_a_new_priority_reaches_the_ledger_row_too():
    """The worker's job table (the ledger's rows) shows each job's priority: it must not go stale."""
    rot = rotation()
    rot.join(7, FAST, 0, 30.0)
    rot.listed(7, 5)
    assert rot.ledger.jobs[7].priority == rot.scheduler.jobs[7].priority == 5


def test_ack_wait_is_the_jobs_own_or_the_shortest_served():
    rot = rotation()
    assert rot.ack_wait_s() == DEFAULT_ACK_WAIT_S == 300.0  # nothing known yet: Antenna's default
    rot.join(1, FAST, 0, 120.0)
    rot.join(2, SLOW, 0, 30.0)
    rot.join(3, FAST, 0, 300.0)
    assert rot.ack_wait_s(1) == 120.0 and rot.ack_wait_s(2) == 30.0 and rot.ack_wait_s(3) == 300.0
    assert rot.ack_wait_s() == 30.0  # the window every served job fits
    assert rot.ack_wait_s(99) == 30.0  # a job not served: the shortest
    rot.leave(2)
    assert rot.ack_wait_s() == 120.0


def test_the_reservation_window_is_a_fraction_of_the_shortest_ack_wait():
    rot = rotation(reserve_fraction=0.25)
    assert rot.window_s() == pytest.approx(75.0)
    rot.join(1, FAST, 0, 40.0)
    rot.join(2, FAST, 0, 100.0)
    assert rot.window_s() == pytest.approx(10.0)


def test_per_image_seconds_are_the_slowest_served_pipelines_spread_over_the_slots():
    one, three = rotation(slots=1), rotation(slots=3)
    assert one.per_image_s() == pytest.approx(1.0)  # no job: the cost model's default
    for rot in (one, three):
        rot.join(1, FAST, 0, 30.0)
    assert one.per_image_s() == pytest.approx(0.1) and three.per_image_s() == pytest.approx(0.1 / 3)
    for rot in (one, three):
        rot.join(2, SLOW, 0, 30.0)
    assert one.per_image_s() == pytest.approx(0.4) and three.per_image_s() == pytest.approx(0.4 / 3)
    for _ in range(50):  # measured: the "fast" pipeline is in fact slower than the other
        one.cost.observe(FAST, 10, 10.0)
    assert one.cost.per_image(FAST) > 0.4 and one.per_image_s() == pytest.approx(one.cost.per_image(FAST))
    one.leave(2)
    assert one.per_image_s() == pytest.approx(one.cost.per_image(FAST))
    one.leave(1)
    assert one.per_image_s() == pytest.approx(1.0)  # nobody served: the default again


def test_batch_limit_fits_the_window_and_the_largest_batch_and_is_never_zero():
    # window 0.5 * 30 s = 15 s; 0.4 s per image on one slot: 37 images start within it; at most 8 a batch
    rot = rotation(max_batch_size=8)
    rot.join(1, SLOW, 0, 30.0)
    assert rot.batch_limit() == 8
    # a 2 s ack_wait: a 1 s window holds 2 images of 0.4 s
    short = rotation(max_batch_size=8)
    short.join(1, SLOW, 0, 2.0)
    assert short.batch_limit() == 2
    # two slots start images twice as often: 5 fit
    two = rotation(slots=2, max_batch_size=8)
    two.join(1, SLOW, 0, 2.0)
    assert two.batch_limit() == 5
    # slower than the whole window: still one at a time (+WPI covers it), never zero
    crawl = rotation(costs={SLOW: 50.0})
    crawl.join(1, SLOW, 0, 30.0)
    assert crawl.batch_limit() == 1
    # a job with a short ack_wait joining shrinks everyone's batches; leaving restores them
    rot.join(2, SLOW, 0, 2.0)
    assert rot.batch_limit() == 2
    rot.leave(2)
    assert rot.batch_limit() == 8
