"""The bench command end to end on a small scenario: real worker processes, the report's contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from antenna_lab.bench.bench import Scenario, job_pipeline
from antenna_lab.bench.compare import small_job_latency, summarize
from antenna_lab.bench.faults import FAULT_SCENARIOS, time_to_recover

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
    "ideal_makespan_model_s", "redeliveries", "duplicate_results", "lost", "errors", "dead_lettered",
    "max_reserved_idle_s", "prefect", "api_requests", "worker_rss_mb", "worker_open_fds", "transport",
    "drain_start_phase_s", "faults", "answers_per_s", "jobs", "saved_makespan_s", "antenna",
}
JOB_KEYS = {"id", "images", "results", "errors", "dead_lettered", "submitted_s", "first_result_s", "completed_s",
            "redelivered", "duplicates", "saved_s", "max_redelivered"}


def run_cli_bench(tmp_path: Path, scenario: dict, *args: str) -> dict:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario))
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "antenna_flows.cli", "--log-level", "WARNING", "bench", "--scenario", str(path),
         *args, "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
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
    # the contract's additions
    assert report["prefect"] is None and report["transport"] == "nats" and report["drain_start_phase_s"] is None
    assert report["dead_lettered"] == 0
    assert 0 <= report["reserved_idle_p99_s"] <= report["max_reserved_idle_s"]
    assert report["mean_unacked_s"] is None or report["mean_unacked_s"] >= 0
    # from the scenario alone: 44 good images of jobs 1 and 2 (job 3 is cancelled), 11 batches of 4, 2 workers
    assert report["ideal_makespan_model_s"] == pytest.approx((44 * 0.01 + 11 * 0.01) / 2, abs=1e-3)
    requests = report["api_requests"]
    assert set(requests) == {"jobs", "tasks", "result", "other"}
    assert requests["result"] > 0 and requests["jobs"] > 0 and requests["tasks"] == 0  # NATS transport
    assert [r["worker"] for r in report["worker_rss_mb"]] == [0, 1]
    for r in report["worker_rss_mb"]:
        assert 10 < r["first"] <= r["peak"] and r["last"] <= r["peak"]
    assert all(r["start"] > 0 and r["end"] > 0 for r in report["worker_open_fds"])
    assert sum(report["answers_per_s"]) == sum(j["results"] + j["errors"] for j in report["jobs"])
    assert [f["action"] for f in report["faults"]] == ["cancel_job"]


DRAIN_SCENARIO = {
    **SCENARIO,
    "name": "tiny-drain",
    "seed": 3,
    "jobs": [{"id": 1, "images": 30, "pipeline": "panama_moths_2024", "submit_at_s": 0.0,
              "bad_images": {"missing": 1, "corrupt": 1}}],
    "faults": [],
}


@pytest.mark.slow
def test_drain_baseline_starts_inside_its_idle_sleep_and_uses_rest(tmp_path: Path) -> None:
    report = run_cli_bench(tmp_path, DRAIN_SCENARIO, "--strategy", "drain", "--orchestration", "plain")
    phases = report["drain_start_phase_s"]
    assert phases == Scenario.model_validate(DRAIN_SCENARIO).drain_phases(5.0)  # seeded: reproducible
    assert len(phases) == 2 and all(0 <= p < 5.0 for p in phases)
    assert report["transport"] == "rest" and report["api_requests"]["tasks"] > 0
    job = report["jobs"][0]
    assert (job["results"], job["errors"]) == (28, 2) and report["lost"] == 0
    # the first poll comes after the rest of the sleep the earliest worker was in, not a full 5 s
    assert job["first_result_s"] < 5.0 - max(phases) + 2.0


@pytest.mark.slow
def test_antenna_costs_make_saves_lag_answers_and_are_reported(tmp_path: Path) -> None:
    """A scenario with an ``antenna`` section: saves take time on one FIFO queue, so a job is saved
    (``saved_s``) after it is answered (``completed_s``); the report says what the cost model did.
    Drain workers (the baseline, which the cost model does not change) against a save worker slower than
    they answer; without the section the same run reports saved_s == completed_s and no figures."""
    costs = {"web_workers": 2, "request_s": {"jobs": 0.02, "tasks": 0.02, "result": 0.02, "result_per_item": 0.002},
             "save_workers": 1, "save_s_per_result": 0.04}
    scenario = {**DRAIN_SCENARIO, "name": "tiny-costs", "antenna": costs,
                "jobs": [{"id": 1, "images": 40, "pipeline": "panama_moths_2024", "submit_at_s": 0.0},
                         {"id": 2, "images": 4, "pipeline": "panama_moths_2024", "submit_at_s": 0.5}]}
    report = run_cli_bench(tmp_path, scenario, "--strategy", "drain", "--orchestration", "plain")
    assert report["lost"] == 0 and [j["pipeline"] for j in report["jobs"]] == [job_pipeline("panama_moths_2024", "sim")] * 2
    for job in report["jobs"]:
        assert job["saved_s"] >= job["completed_s"] > job["submitted_s"]
        assert job["save_delay_mean_s"] > 0 and "_save_delays" not in job
    assert report["saved_makespan_s"] >= 44 * 0.04 * 0.9  # 44 saves one at a time
    antenna = report["antenna"]
    assert antenna["model"] == Scenario.model_validate(scenario).antenna.model_dump()
    assert antenna["saves_done"] >= 44 and antenna["save_queue_peak"] >= 2
    assert antenna["save_delay_s"]["n"] >= 44 and set(antenna["save_delay_by_job_images"]) == {"40", "4"}
    # served by a web worker vs received: a few /tasks calls may still be queued or waiting out their fetch
    # when the run ends (counted as received, not yet as served)
    assert report["api_requests"]["tasks"] >= antenna["web"]["tasks"]["requests"] >= report["api_requests"]["tasks"] - 8
    assert antenna["web"]["tasks"]["requests"] > 0

    plain = run_cli_bench(tmp_path, {**scenario, "name": "tiny-free", "antenna": None}, "--strategy", "drain",
                          "--orchestration", "plain")
    assert plain["antenna"] is None and plain["saved_makespan_s"] == plain["makespan_s"]
    assert all(j["saved_s"] == j["completed_s"] for j in plain["jobs"])


@pytest.mark.slow
def test_fair_rest_transport_from_the_command_line(tmp_path: Path) -> None:
    sc = {**DRAIN_SCENARIO, "name": "tiny-rest"}
    report = run_cli_bench(tmp_path, sc, "--strategy", "fair", "--orchestration", "plain", "--transport", "rest")
    assert report["transport"] == "rest" and report["api_requests"]["tasks"] > 0
    assert report["lost"] == 0 and report["jobs"][0]["results"] == 28


def test_small_job_that_never_completed_counts_as_the_worst() -> None:
    report = {"time_limit_s": 60, "wall_s": 60.2, "jobs": [
        {"id": 1, "images": 10, "submitted_s": 0.0, "completed_s": 1.5},
        {"id": 2, "images": 10, "submitted_s": 5.0, "completed_s": None},
        {"id": 3, "images": 8, "submitted_s": 1.0, "completed_s": None, "cancelled": True},
        {"id": 4, "images": 500, "submitted_s": 0.0, "completed_s": 30.0},
    ]}
    assert small_job_latency(report, 10) == [1.5, 55.2]
    summary = summarize([{**report, "makespan_s": 30.0, "ideal_makespan_s": 20.0, "images_per_s": 1.0,
                          "redeliveries": 0, "duplicate_results": 0, "lost": 10, "max_reserved_idle_s": 0.1,
                          "startup_s": 1.0}], 10, 60)
    assert summary["small_jobs_worst_s"] == 55.2 and summary["small_jobs_incomplete"] == 1


def test_ideal_makespan_from_the_scenario_alone() -> None:
    sc = Scenario.model_validate({
        "workers": 2, "model": {"kind": "sim", "seconds_per_image": 0.1, "seconds_per_batch": 0.5},
        "drain": {"batch_size": 8},
        "jobs": [{"id": 1, "images": 20, "bad_images": {"missing": 2}},
                 {"id": 2, "images": 5, "pipeline": "quebec_vermont_moths_2023"},
                 {"id": 3, "images": 100}],
        "faults": [{"at_s": 1, "action": "cancel_job", "job": 3}],
    })
    # 18 + 5 images; batches hold one pipeline: ceil(18/8) + ceil(5/8) = 4
    assert sc.ideal_makespan_model_s() == pytest.approx((23 * 0.1 + 4 * 0.5) / 2)
    assert Scenario.model_validate({"model": {"kind": "ami"}}).ideal_makespan_model_s() is None


def test_time_to_recover() -> None:
    steady = [50] * 10
    assert time_to_recover(steady, 4.0, 50.0) == 0.0
    dipped = [50, 50, 50, 50, 10, 0, 20, 45, 50, 50, 50, 12]
    assert time_to_recover(dipped, 4.0, 50.0) == 3.0
    never = [50, 50, 50, 50, 10, 10, 10, 10, 10]
    assert time_to_recover(never, 4.0, 50.0) is None


def test_fault_scenarios_are_one_mix_with_one_fault_each() -> None:
    bundled = Path(__file__).resolve().parents[1] / "antenna_lab" / "bench" / "scenarios"
    base = Scenario.load(bundled / "faults-none.json")
    assert not base.faults
    for name in FAULT_SCENARIOS:
        sc = Scenario.load(bundled / f"{name}.json")
        assert sc.queue.max_deliver >= 3 and sc.workers == base.workers
        assert [j.images for j in sc.jobs] == [j.images for j in base.jobs], name
        assert len(sc.faults) == (0 if name == "faults-bad-images" else 1), name


def test_every_shared_scenario_parses() -> None:
    shared = Path(__file__).resolve().parents[3] / "shared" / "bench"
    bundled = Path(__file__).resolve().parents[1] / "antenna_lab" / "bench" / "scenarios"
    files = sorted(bundled.glob("*.json")) + sorted(shared.glob("*.json"))
    assert len(list(bundled.glob("*.json"))) >= 15
    for path in files:
        scenario = Scenario.load(path)
        assert scenario.jobs and scenario.workers >= 1, path


HANG_SCENARIO = {
    **SCENARIO,
    "name": "tiny-hang",
    "queue": {"ack_wait_s": 2.0, "max_deliver": 3, "max_ack_pending": 1000},
    "jobs": [{"id": 1, "images": 30, "pipeline": "panama_moths_2024", "submit_at_s": 0.0,
              "bad_images": {"missing": 1, "corrupt": 1, "hanging": 2, "hang_s": 3.0}}],
    "faults": [],
}


@pytest.mark.slow
def test_an_image_server_that_hangs_then_answers_garbage(tmp_path: Path) -> None:
    report = run_cli_bench(tmp_path, HANG_SCENARIO, "--strategy", "fair", "--orchestration", "plain")
    job = report["jobs"][0]
    assert (job["results"], job["errors"]) == (26, 4) and report["lost"] == 0
    assert job["completed_s"] >= 3.0  # the hanging downloads were waited out, not skipped
    # the wait counts as reservation idle time (it is real): the figure is not only the slot's view
    assert report["max_reserved_idle_s"] >= 3.0
    assert Scenario.model_validate(HANG_SCENARIO).ideal_makespan_model_s() == pytest.approx((26 * 0.01 + 7 * 0.01) / 2)
