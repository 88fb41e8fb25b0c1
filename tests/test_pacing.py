"""Pacing to Antenna's saves (antenna_flows/pacing.py): pure arithmetic on a fake clock."""

from __future__ import annotations

import math

from antenna_flows.pacing import SavePacer

from tests.helpers import Clock


def test_no_window_until_saves_are_seen_then_the_window_follows_the_save_rate():
    clock = Clock()
    pacer = SavePacer(backlog_s=5.0, initial_hold_s=2.0, min_backlog=4.0, clock=clock)
    assert math.isinf(pacer.allowance(1.0))  # nothing known: the GPU's budget alone
    pacer.delivered(1, 40)
    pacer.saved(1, 0)
    for _ in range(10):  # Antenna saves 3 per second
        clock.t += 1
        pacer.saved(1, pacer._jobs[1].done + 3)
    assert abs(pacer.save_rate() - 3.0) < 1e-9
    assert abs(pacer.window() - (3.0 * 5.0 + 3.0 * 2.0)) < 1e-9  # 15 queued + 6 held while the queue drains
    # 40 handed out, 30 saved: 10 in flight, room for 11, of which a quarter-share worker takes 2.75
    assert abs(pacer.in_flight() - 10) < 1e-9
    assert abs(pacer.allowance(0.25) - 11 * 0.25) < 1e-9


def test_a_growing_backlog_closes_the_window_and_saves_reopen_it():
    clock = Clock()
    pacer = SavePacer(backlog_s=5.0, initial_hold_s=1.0, min_backlog=4.0, clock=clock)
    pacer.saved(1, 0)
    pacer.delivered(1, 100)  # the fleet answered far faster than Antenna saves
    for i in range(1, 11):
        clock.t += 1
        pacer.saved(1, 2 * i)  # 2 saves per second
    assert pacer.allowance(1.0) == 0.0  # 80 in flight against a window of 12
    assert pacer.save_delay_s() > 30  # an answer posted now would wait that long
    for i in range(11, 51):
        clock.t += 1
        pacer.saved(1, 2 * i)
    assert abs(pacer.in_flight() - 0) < 1e-9 and pacer.allowance(1.0) == 12.0  # drained: room again


def test_between_readings_saves_are_extrapolated_at_the_measured_rate():
    clock = Clock()
    pacer = SavePacer(backlog_s=5.0, min_backlog=4.0, clock=clock)
    pacer.delivered(1, 50)
    pacer.saved(1, 0)
    for i in range(1, 6):
        clock.t += 1
        pacer.saved(1, 4 * i)  # 4 per second; 30 in flight at the last reading
    clock.t += 2.5  # no reading for 2.5 s (over REST readings are seconds apart)
    assert abs(pacer.in_flight() - (30 - 4 * 2.5)) < 1e-9


def test_redeliveries_of_a_drained_job_do_not_count_against_the_window():
    pacer = SavePacer(clock=Clock())
    assert not pacer.only_redeliveries(1)  # unknown
    pacer.undelivered(1, 3)
    assert not pacer.only_redeliveries(1)
    pacer.undelivered(1, 0)
    assert pacer.only_redeliveries(1)


def test_a_redelivered_unsaved_answer_cuts_the_window_for_a_while():
    clock = Clock()
    pacer = SavePacer(backlog_s=10.0, initial_hold_s=0.0, min_backlog=1.0, clock=clock)
    pacer.saved(1, 0)
    for i in range(1, 11):
        clock.t += 1
        pacer.saved(1, 2 * i)
    before = pacer.window()
    pacer.lag_seen()
    assert pacer.window() < before
    clock.t += 31
    for i in range(11, 20):
        pacer.saved(1, 2 * i)
        clock.t += 1
    rate = pacer.save_rate()
    assert rate and abs(pacer.window() - max(1.0, rate * 10.0)) < 1e-9  # the cut has worn off


def test_saves_that_fail_are_not_lag():
    clock = Clock()
    pacer = SavePacer(clock=clock)
    pacer.delivered(1, 10)
    pacer.saved(1, 0)
    clock.t += 5
    pacer.saved(1, 0)  # nothing saved at all: answers are being lost, not queued
    assert pacer.save_delay_s() == 0.0


def test_before_the_first_save_rate_a_worker_keeps_at_most_its_gpus_holding_unsaved():
    clock = Clock()
    pacer = SavePacer(clock=clock)
    pacer.cold_limit = 32
    assert math.isinf(pacer.allowance(1.0))  # no reading at all: nothing to pace by
    pacer.saved(1, 0)  # a first reading: Antenna has saved nothing yet
    pacer.took(24)
    pacer.delivered(1, 24)  # (a reservation tells both: what this worker took, how far the job was handed out)
    assert pacer.allowance(1.0) == 8  # 24 unsaved of 32
    pacer.took(8)
    pacer.delivered(1, 32)
    assert pacer.allowance(1.0) == 0  # an Antenna slower than the GPU: no flood before its pace is known
    clock.t += 0.25
    pacer.saved(1, 16)  # saves come in (the rate is not known yet: readings span less than a second)
    assert pacer.save_rate() is None
    assert pacer.allowance(1.0) == 16  # the saves seen count: 16 of its 32 are still unsaved


def test_a_worker_that_starts_after_the_saves_reads_what_is_in_flight_not_what_it_took():
    """A worker whose first reading comes after Antenna saved what it took (a fast stand-in, a
    restart) saw no save happen: it must not count those tasks as unsaved for ever."""
    clock = Clock()
    pacer = SavePacer(clock=clock)
    pacer.cold_limit = 16
    pacer.saved(1, 0)
    pacer.took(16)
    pacer.delivered(1, 16)
    assert pacer.allowance(1.0) == 0
    clock.t += 0.25
    pacer.saved(1, 16, delivered=16)  # all saved before the second reading: no rate yet (too short)
    assert pacer.save_rate() is None
    assert pacer.allowance(1.0) == 16

    restarted = SavePacer(clock=clock)  # the job was half done when this worker came: no evidence of a pace
    restarted.cold_limit = 16
    restarted.saved(2, 300, delivered=324)  # 24 in flight, held by a worker that died
    clock.t += 30.0
    restarted.saved(2, 300, delivered=324)
    assert restarted.save_rate() is None  # not "saves stopped": nothing was seen saving
    assert restarted.allowance(1.0) == 16  # it took nothing yet: what its own GPU holds
    assert restarted.stalled(after_s=20.0)  # nothing moved for longer than ack_wait: the worker may probe


def test_a_worker_whose_first_takes_were_saved_unseen_keeps_its_gpu_fed_between_readings():
    """What a worker took before its first reading was saved unseen (no reading counted those saves): it
    counts as unsaved only as far as the fleet has anything in flight, so after the reading it takes its
    GPU's holding again, batch by batch, without waiting for the next reading each time."""
    clock = Clock()
    pacer = SavePacer(clock=clock)
    pacer.readings_expected = True
    pacer.cold_limit = 24
    pacer.took(24)
    pacer.delivered(1, 48)  # two workers took 24 each
    assert pacer.allowance(0.5) == 0  # no reading yet: what it took counts whole
    clock.t += 0.5
    pacer.saved(1, 48, delivered=48)  # the first reading: all 48 saved already
    assert pacer.allowance(0.5) == 24
    pacer.took(8)
    pacer.delivered(1, 56)
    assert pacer.allowance(0.5) == 16  # one batch in flight: two more before the next reading
    pacer.took(16)
    pacer.delivered(1, 72)
    assert pacer.allowance(0.5) == 0  # its GPU's holding, unsaved: wait for Antenna


def test_saves_that_stop_make_the_fleet_stalled_after_ack_wait_so_redeliveries_are_fetched():
    clock = Clock()
    pacer = SavePacer(clock=clock)
    pacer.saved(1, 0, delivered=0)
    for i in range(1, 11):
        clock.t += 1.0
        pacer.saved(1, 10 * i, delivered=10 * i + 20)
    assert pacer.save_rate() > 5 and not pacer.stalled(after_s=15.0)
    for _ in range(20):  # a database outage: nothing saved for 20 s
        clock.t += 1.0
        pacer.saved(1, 100, delivered=120)
    assert pacer.save_rate() == 0.0
    assert pacer.stalled(after_s=15.0) and not pacer.stalled(after_s=25.0)


def test_tasks_waiting_in_the_workers_are_not_read_as_antenna_s_save_backlog():
    """A GPU-bound fleet holds many reserved tasks waiting for its GPUs; they are in flight but not in
    Antenna's save queue, so they must not make the fleet look Antenna-bound (paced chunks of one job)."""
    clock = Clock()
    pacer = SavePacer(clock=clock, backlog_s=5.0)
    pacer.held_for(0.3)
    for i in range(11):  # saves keep up at 70/s; 160 handed out and not saved (what the GPUs hold)
        pacer.saved(1, 70 * i, delivered=70 * i + 160)
        clock.t += 1.0
    clock.t -= 1.0
    assert pacer.save_delay_s() > 1.0  # the pipeline's latency alone explains 21 of the 160
    pacer.fleet_holding = lambda: 150.0  # the workers say they hold 150 unanswered
    assert pacer.backlog() == 10 and pacer.save_delay_s() < 0.2
    assert not pacer.bound()
    # and they widen the window by what they are: the room left is the queue allowed, not less
    assert pacer.window() >= 150 + 5.0 * pacer.save_rate()
    assert pacer.allowance(1.0) >= 5.0 * pacer.save_rate() - 10 - 1


def test_while_antenna_bound_answers_wait_for_posts_as_long_as_they_would_wait_in_its_queue():
    """The poster batches answers for half of what they would wait in Antenna's save queue anyway. While
    Antenna-bound that queue is the one the fleet keeps on purpose (``backlog_s``), whatever the estimate
    says once what the workers hold is taken out; GPU-bound it is the estimate."""
    clock = Clock()
    pacer = SavePacer(clock=clock, backlog_s=5.0)
    pacer.fleet_holding = lambda: 27.0
    for i in range(11):  # Antenna saves 5/s; 40 in flight, 27 of them held by the workers
        pacer.saved(1, 5 * i, delivered=5 * i + 40)
        clock.t += 1.0
    clock.t -= 1.0
    assert pacer.backlog() == 13 and pacer.bound()  # 13 queued: over half the 25 the fleet may queue
    assert 2.5 < pacer.save_delay_s() < 2.7
    assert pacer.post_wait_s() == 5.0
    pacer.fleet_holding = lambda: 39.0  # the workers hold nearly everything: saves keep up
    clock.t += 11.0  # past BOUND_HOLD_S since it was last bound
    pacer.saved(1, 105, delivered=145)
    assert not pacer.bound()
    assert pacer.post_wait_s() == pacer.save_delay_s() < 1.0
