"""The bench command end to end on a small scenario: real worker processes, the report's contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from antenna_flows.lab.bench.bench import Scenario

pytestmark = pytest.mark.slow

SCENARIO = {
    "name": "tiny",
    "workers": 2,
    "queue": {"ack_wait_s": 3.0, "max_deliver": 3, "max_ack_pending": 1000},
    "model": {"kind": "sim", "seconds_per_image": 0.01, "seconds_per_batch": 0.01},
    "images": {"width": 320, "height": 240},
    "drain": {"batch_size": 4, "loaders": 2, "prefetch": 2},
    "jobs": [
        {"id": 1, "images": 40, "pipeline": "panama_moths_2024", "submit_at_s": 0.0},
        {"id": 2, "images": 6, "pipeline": "panama_moths_2024", "submit_at_s": 0.3,
         "bad_images": {"missing": 1, "corrupt": 1}},
        {"id": 3, "images": 200, "pipeline": "panama_moths_2024", "submit_at_s": 0.0},
    ],
    "faults": [{"at_s": 1.0, "action": "cancel_job", "job": 3}],
    "time_limit_s": 60,
}

REPORT_KEYS = {
    "scenario", "strategy", "workers", "startup_s", "makespan_s", "images_per_s", "ideal_makespan_s",
    "redeliveries", "duplicate_results", "lost", "errors", "max_reserved_idle_s", "jobs",
}
JOB_KEYS = {"id", "images", "results", "errors", "submitted_s", "first_result_s", "completed_s", "redelivered", "duplicates"}


def test_bench_runs_a_scenario_and_reports_per_the_shared_format(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.json"
    scenario.write_text(json.dumps(SCENARIO))
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "antenna_flows.cli", "--log-level", "WARNING", "bench", "--scenario", str(scenario),
         "--strategy", "fair", "--orchestration", "plain", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report)
    jobs = {j["id"]: j for j in report["jobs"]}
    assert all(JOB_KEYS <= set(j) for j in jobs.values())
    assert (jobs[1]["results"], jobs[1]["errors"]) == (40, 0)
    assert (jobs[2]["results"], jobs[2]["errors"]) == (4, 2)  # the broken images end as error results
    assert jobs[3]["results"] < 200  # cancelled mid-way; its unanswered images are not "lost"
    assert report["lost"] == 0 and report["redeliveries"] == 0 and report["duplicate_results"] == 0
    assert report["errors"] == 2
    # slot seconds / workers: no scheduler beats it (give or take a batch spent on the cancelled job)
    assert 0 < report["ideal_makespan_s"] <= report["makespan_s"] + 0.5
    assert report["max_reserved_idle_s"] <= SCENARIO["queue"]["ack_wait_s"] / 2
    assert jobs[1]["completed_s"] <= report["makespan_s"] and jobs[2]["first_result_s"] >= jobs[2]["submitted_s"]


def test_every_shared_scenario_parses() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "bench"
    bundled = Path(__file__).resolve().parents[1] / "antenna_flows" / "scenarios"
    files = sorted(bundled.glob("*.json")) + sorted(shared.glob("*.json"))
    assert len(files) >= 4
    for path in files:
        scenario = Scenario.load(path)
        assert scenario.jobs and scenario.workers >= 1, path
