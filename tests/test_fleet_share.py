"""This worker's share of the fleet (antenna_flows/fleet_share.py): pure arithmetic on a fake clock."""

from __future__ import annotations

from antenna_flows.fleet_share import FleetShare

from tests.helpers import Clock


def test_fleet_share_reads_the_workers_share_from_consumer_sequences():
    clock = Clock()
    share = FleetShare(clock)
    assert share.share() == 1.0 and share.fleet_size() == 1.0  # alone until told otherwise
    share.observe(7, [1, 2, 3, 4])
    last = 4
    for _ in range(40):  # four workers taking turns: between our reservations the fleet took 16
        clock.t += 1
        share.observe(7, range(last + 13, last + 17))
        last += 16
    assert abs(share.share() - 0.25) < 0.01 and abs(share.fleet_size() - 4.0) < 0.2
    clock.t += 400  # a quiet spell: the last estimate is kept, not reset
    assert abs(share.fleet_size() - 4.0) < 0.2

def test_a_job_reserved_from_rarely_does_not_inflate_the_fleet():
    """Two reservations from a job a minute apart: what the fleet took in that minute is spread over it."""
    clock = Clock()
    share = FleetShare(clock, window_s=30.0)
    share.observe(1, [1, 2, 3, 4], pending=500)
    for i in range(60):  # job 2: every second, this worker takes 1 of the fleet's 4
        clock.t += 1
        share.observe(2, [4 * i + 4], pending=0 if i == 59 else 1000)
    share.observe(1, range(241, 245), pending=0)  # job 1 again, 60 s later: 240 deliveries since, none left
    # in the last 30 s: ours 30 + 4 = 34 of the fleet's 30*4 + 240/2 = 240
    assert abs(share.share() - 34 / 240) < 1e-9

def test_the_consumers_own_counter_wins_over_reply_subjects():
    clock = Clock()
    share = FleetShare(clock)
    share.consumer(1, 100)
    for _ in range(10):
        clock.t += 1
        share.observe(1, [0 + 1])  # reply subjects say little; the consumer says 20 per second
        share.consumer(1, share._last[1][1] + 20)
    assert abs(share.share() - 10 / 200) < 1e-9

def test_over_rest_the_fleets_unseen_deliveries_since_a_jobs_last_reading_are_counted():
    """Readings of a job come only with this worker's own reservations (REST): between them, and
    since the last one, the fleet goes on taking at the pace it was seen taking."""
    clock = Clock()
    share = FleetShare(clock, window_s=60.0)
    seq = 0
    for _ in range(12):  # every 5 s this worker takes 5 of the 20 the fleet took since its last look
        seq += 20
        share.observe(3, range(seq - 4, seq + 1), pending=10_000)
        clock.t += 5.0
    # now 5 s since the last look: ~20 more were taken unseen; without counting them the share reads high
    assert abs(share.share() - 0.25) < 0.03  # (the window's edge cuts an own reservation)


def test_what_the_others_hold_comes_from_the_roll_call_and_only_when_every_peer_says_it():
    clock = Clock()
    share = FleetShare(clock)
    assert share.others_holding("w0") == 0.0  # alone: nobody else holds anything
    share.peer("w0", 5)
    share.peer("w1", 12)
    share.peer("w2", 3)
    assert share.others_holding("w0") == 15.0  # its own count is its own, fresh: not the announced one
    share.peer("w3")  # a peer that does not say what it holds: the fleet's holding is unknown
    assert share.others_holding("w0") is None
    clock.t += 5.0
    share.peer("w0", 5)
    share.peer("w1", 12)
    clock.t += 6.0  # w2 and w3 silent for over PEER_TTL_S: gone
    assert share.others_holding("w0") == 12.0 and share.peers() == 2
