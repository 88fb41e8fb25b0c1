"""What a worker did, per job (antenna_flows/accounting.py): ledger rows, totals, shares, BatchLog lines.

The ledger is pure bookkeeping, so it runs on a fake clock; BatchLog writes real files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from antenna_flows.accounting import BatchLog, JobLedger, Ledger


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_job_row_is_made_once_and_keeps_what_it_was_told():
    ledger = Ledger(worker="w", clock=Clock())
    row = ledger.job(5, "sim-a", 2)
    assert ledger.job(5) is row and (row.pipeline, row.priority) == ("sim-a", 2)  # None changes nothing
    ledger.job(5, priority=0)
    assert (row.pipeline, row.priority) == ("sim-a", 0)
    assert ledger.job(6).pipeline == "" and list(ledger.jobs) == [5, 6]


def test_reservations_posts_and_named_counters_add_up_per_job():
    clock = Clock(100.0)
    ledger = Ledger(worker="w", clock=clock)
    ledger.reserved(1, 4)
    clock.t = 101.0
    ledger.reserved(1, 3, redelivered=2)
    ledger.reserved(2, 1)
    ledger.posted(1, 5, 1)
    clock.t = 104.0
    ledger.posted(1, 1, 0)
    ledger.post_made(1)
    ledger.post_made(1)
    for what in ("released", "dropped", "terminated", "reanswered", "recomputed", "saved"):
        ledger.count(2, what)
    ledger.count(2, "released", 4)
    one, two = ledger.job(1), ledger.job(2)
    assert (one.reserved, one.redelivered, one.images, one.errors, one.posts) == (7, 2, 6, 1, 2)
    assert one.first_reserved_at == 100.0 and one.last_posted_at == 104.0  # the first reservation, the last post
    assert (two.released, two.dropped, two.terminated, two.reanswered, two.recomputed, two.saved) == (5, 1, 1, 1, 1, 1)
    with pytest.raises(AttributeError):
        ledger.count(2, "relased")  # a misspelt counter is a bug, not a new column


def test_images_per_second_of_a_job_span_its_first_reservation_to_its_last_post():
    clock = Clock(10.0)
    ledger = Ledger(worker="w", clock=clock)
    assert JobLedger(1).images_per_s == 0.0
    ledger.reserved(1, 10)
    assert ledger.job(1).images_per_s == 0.0  # nothing posted yet
    clock.t = 14.0
    ledger.posted(1, 6, 2)
    assert ledger.job(1).images_per_s == pytest.approx(8 / 4.0)
    ledger.reserved(2, 1)
    ledger.posted(2, 1, 0)  # posted at the instant it was reserved: no span, no rate
    assert ledger.job(2).images_per_s == 0.0


def test_batches_charge_each_job_its_share_and_remember_the_longest_wait():
    ledger = Ledger(worker="w", clock=Clock())
    ledger.batch({1: 0.3, 2: 0.1}, {1: 3, 2: 1}, {1: 2.0, 2: 0.5})
    ledger.batch({1: 0.2}, {1: 2}, {1: 1.0})
    assert ledger.batches == 2 and ledger.slot_busy_s == pytest.approx(0.6)
    one, two = ledger.job(1), ledger.job(2)
    assert (one.batches, two.batches) == (2, 1)
    assert one.slot_s == pytest.approx(0.5) and two.slot_s == pytest.approx(0.1)
    assert one.max_reserved_idle_s == 2.0 and two.max_reserved_idle_s == 0.5


def test_totals_over_the_workers_uptime():
    clock = Clock(0.0)
    ledger = Ledger(worker="w", clock=clock)
    ledger.job(3)
    ledger.batch({1: 1.5, 2: 0.5}, {1: 3, 2: 1}, {})
    ledger.posted(1, 3, 0)
    ledger.posted(2, 0, 1)
    clock.t = 8.0
    assert ledger.uptime_s == 8.0
    assert ledger.totals() == {
        "jobs": 3, "images": 3, "errors": 1, "batches": 1, "slot_busy_s": 2.0, "uptime_s": 8.0,
        "slot_utilisation": 0.25, "images_per_s": 0.5,
    }
    clock.t = 0.0  # no time has passed: no rates, no division by zero
    assert ledger.totals()["slot_utilisation"] == 0.0 and ledger.totals()["images_per_s"] == 0.0


def test_rows_are_one_per_job_in_id_order_with_slot_shares_and_no_raw_timestamps():
    clock = Clock(0.0)
    ledger = Ledger(worker="w", clock=clock)
    ledger.job(9, "sim-b", 1)
    ledger.reserved(4, 4)
    ledger.batch({4: 0.75, 9: 0.25}, {4: 3, 9: 1}, {4: 1.23456, 9: 0.1})
    clock.t = 2.0
    ledger.posted(4, 4, 0)
    rows = ledger.rows()
    assert [r["job_id"] for r in rows] == [4, 9]
    four, nine = rows
    assert four["slot_share"] == 0.75 and nine["slot_share"] == 0.25
    assert four["images_per_s"] == 2.0 and nine["images_per_s"] == 0.0
    assert four["max_reserved_idle_s"] == 1.235
    assert nine["pipeline"] == "sim-b" and nine["priority"] == 1
    assert "first_reserved_at" not in four and "last_posted_at" not in four
    assert set(four) >= {"reserved", "images", "errors", "slot_s", "batches", "redelivered", "released", "posts"}
    json.dumps(rows)  # table artifacts and the terminal take them as they are


def test_rows_before_any_batch_have_zero_shares():
    ledger = Ledger(worker="w", clock=Clock())
    ledger.job(1, "sim-a")
    [row] = ledger.rows()
    assert row["slot_share"] == 0.0 and row["slot_s"] == 0.0


def test_batch_log_writes_one_json_line_per_batch(tmp_path: Path):
    path = tmp_path / "batches.jsonl"
    log = BatchLog(path, "gpu-0")
    before = time.time()
    log.write("sim-a", 0.25, {3: 2, 11: 1}, 1.5)
    log.write("sim-b", 0.1, {3: 4}, 0.0)
    line_one = path.read_text().splitlines()[0]  # line-buffered: readable before close
    log.close()
    other = BatchLog(path, "gpu-1")  # a second worker appends to the same file
    other.write("sim-a", 0.05, {7: 1}, 0.2)
    other.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert json.loads(line_one) == lines[0]
    assert [(l["worker"], l["pipeline"], l["n"], l["jobs"]) for l in lines] == [
        ("gpu-0", "sim-a", 3, {"3": 2, "11": 1}),
        ("gpu-0", "sim-b", 4, {"3": 4}),
        ("gpu-1", "sim-a", 1, {"7": 1}),
    ]
    first = lines[0]
    assert first["slot_s"] == 0.25 and first["max_reserved_idle_s"] == 1.5
    assert first["t_end"] - first["t_start"] == pytest.approx(0.25)
    assert before <= first["t_end"] <= time.time()  # wall-clock stamps, to line up processes


def test_batch_log_without_a_path_writes_nothing(tmp_path: Path):
    log = BatchLog(None, "gpu-0")
    log.write("sim-a", 0.25, {1: 1}, 0.0)
    log.close()
    assert list(tmp_path.iterdir()) == []
