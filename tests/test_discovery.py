"""Discovery (antenna_flows/worker/discovery.py): which jobs a worker serves, from Antenna's job list."""

from __future__ import annotations

import random
from itertools import islice

from antenna_flows.worker.discovery import poll_waits


def test_polls_start_at_a_random_phase_then_keep_the_mean_interval():
    phases = [next(poll_waits(4.0, random.Random(name))) for name in ("w0", "w1", "w2", "w3")]
    assert all(0.0 <= p < 4.0 for p in phases) and len(set(phases)) == 4  # a fleet does not poll in lock-step
    later = list(islice(poll_waits(4.0, random.Random(1)), 1, 2001))
    assert all(3.0 <= x <= 5.0 for x in later)
    assert abs(sum(later) / len(later) - 4.0) < 0.05  # the mean request rate stays 1 / interval
