"""How the queue report turns readings into rows and words (antenna_flows/queue_report/rows.py): plain data in,
rows out, no I/O. Both shapes of Antenna's job object, the rate and ETA between two readings, the
columns taken from NATS or, without it, from the job object, and the words under each progress bar."""

from __future__ import annotations

import datetime as dt
import json

from antenna_flows.jetstream import ConsumerStats
from antenna_flows.queue_report.rows import (
    build_rows,
    final_progress,
    human_duration,
    iso_time,
    job_counts,
    jobs_gone,
    parse_time,
    progress_description,
    report_description,
    served_jobs,
    table_rows,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def test_job_counts_reads_the_local_api_and_real_antenna_shapes():
    local = {"id": 7, "pipeline_slug": "p", "status": "STARTED", "total": 50, "results": 20, "errors": 2}
    assert (job_counts(7, local).total, job_counts(7, local).processed, job_counts(7, local).pipeline) == (50, 22, "p")
    antenna = {
        "id": 8,
        "pipeline": {"slug": "panama_moths_2024"},
        "status": "STARTED",
        "progress": {
            "summary": {"status": "STARTED", "progress": 0.3},
            "stages": [
                {"key": "collect", "params": [{"key": "total_images", "value": 100}]},
                {"key": "process", "params": [
                    {"name": "Processed", "key": "processed", "value": 30},
                    {"name": "Remaining", "key": "remaining", "value": 70},
                    {"name": "Failed", "key": "failed", "value": 5},
                ]},
            ],
        },
    }
    counts = job_counts(8, antenna)
    assert (counts.total, counts.results, counts.errors, counts.pipeline, counts.status) == (
        100, 25, 5, "panama_moths_2024", "STARTED"
    )
    assert job_counts(9, None).processed is None
    assert job_counts(9, {"status": {"value": "PENDING"}, "progress": {"stages": []}}).status == "PENDING"


def test_table_rows_times_and_durations():
    assert table_rows(json.dumps([{"a": 1}])) == [{"a": 1}]
    assert table_rows({"columns": ["a", "b"], "data": [[1, 2]]}) == [{"a": 1, "b": 2}]
    assert table_rows("not json") == [] and table_rows(None) == []
    assert human_duration(3725) == "1h02m" and human_duration(59.6) == "1m00s" and human_duration(None) == ""
    assert human_duration(3 * 86400 + 7200) == "3d02h" and human_duration(12) == "12s"
    assert parse_time("2026-01-01T00:00:00.250Z") == dt.datetime(2026, 1, 1, 0, 0, 0, 250000, tzinfo=dt.timezone.utc)
    assert parse_time(iso_time(NOW)) == NOW and parse_time("yesterday") is None
    assert served_jobs([{"job_id": 1, "images": 3}, {"job_id": 2, "images": 0, "errors": 1},
                        {"job_id": 3, "images": 0}, {"job_id": None}]) == {1, 2}


def test_rows_rate_and_eta_from_the_previous_reading():
    details = {501: {"pipeline_slug": "p", "status": "STARTED", "total": 20, "results": 10, "errors": 1}}
    stats = {501: ConsumerStats(job_id=501, messages=20, pending=8, ack_pending=1, redelivered=0, delivered_msgs=12,
                                deliveries=14, ack_wait_s=30.0, max_deliver=5)}  # 2 redeliveries
    previous = [{"job_id": 501, "read_at": iso_time(NOW - dt.timedelta(seconds=60)), "processed": 5}]
    (row,) = build_rows(NOW, [(501, "p")], details, stats, previous, {501: ["gpu-a-gpu0", "gpu-b-gpu1"]})
    assert (row["msgs"], row["pending"], row["ack_pending"], row["redelivered"], row["redeliveries"]) == (20, 8, 1, 0, 2)
    assert (row["results"], row["errors"], row["processed"], row["total"], row["progress_pct"]) == (10, 1, 11, 20, 55.0)
    assert row["images_per_s_1m"] == 0.1 and row["eta_s"] == 90.0 and row["eta"] == "1m30s"  # 6 images in 60 s, 9 left
    assert row["workers"] == "gpu-a-gpu0, gpu-b-gpu1" and row["read_at"] == iso_time(NOW)
    assert progress_description(row) == ("**job 501** (p, STARTED): 11 of 20 images, 1 errors, 0.1 images/s, ETA 1m30s, "
                                         f"workers: gpu-a-gpu0, gpu-b-gpu1 (as of {iso_time(NOW)}).")
    assert report_description(NOW, [row], None) == (
        "**Queue** at 2026-03-01 12:00:00 UTC: 1 incomplete jobs, 1 progressing, 0.10 images/s in all since "
        "the previous report; 8 images pending, 1 reserved (ack_pending).")


def test_rows_without_nats_or_an_earlier_reading():
    """NATS unreachable: the queue columns the local API samples; no earlier reading: no rate, no ETA."""
    details = {7: {"total": 10, "results": 0, "errors": 0, "messages": 10, "pending": 10, "ack_pending": 0,
                   "redelivered": 0}}
    (row,) = build_rows(NOW, [(7, "p")], details, {}, [], {})
    assert (row["msgs"], row["pending"], row["ack_pending"], row["redeliveries"]) == (10, 10, 0, None)
    assert row["images_per_s_1m"] is None and row["eta"] == "" and row["workers"] == ""
    assert "images/s: next reading" in progress_description(row)
    (bare,) = build_rows(NOW, [(8, None)], {}, {}, [], {})  # Antenna did not answer for it
    assert (bare["total"], bare["processed"], bare["progress_pct"], bare["msgs"]) == (None, None, None, None)
    assert report_description(NOW, [row], "cannot reach NATS at nats://x:4222 (OSError: down)").endswith(
        ". cannot reach NATS at nats://x:4222 (OSError: down)")


def test_jobs_that_left_the_list_get_a_last_progress():
    previous = [{"job_id": 1}, {"job_id": 2}, {"job_id": None}]
    assert jobs_gone(previous, [2, 3]) == [1]
    pct, words = final_progress(job_counts(1, {"status": "SUCCESS", "total": 10, "results": 9, "errors": 1}), NOW)
    assert pct == 100.0 and words == f"**job 1** (?): SUCCESS, 10 of 10 images, 1 errors (as of {iso_time(NOW)})."
    pct, words = final_progress(job_counts(2, {"status": "FAILURE", "total": 10, "results": 4, "errors": 0}), NOW)
    assert pct == 40.0 and "FAILURE, 4 of 10 images" in words
