"""Side-by-side benchmark runs in one invocation, with the ratios BENCHMARKS.md reports.

Runs one scenario as: the fair worker under Prefect, the same under plain
asyncio, and the upstream drain pattern (several times: its random job choice
makes it swing), on the same machine, one after another, sharing one Prefect
server. Each figure is the median over its repeats.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from antenna_lab.bench.bench import BenchOptions, PrefectServer, Scenario, run_bench


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def small_job_latency(report: dict[str, Any], max_images: int, time_limit_s: float | None = None,
                      field: str = "completed_s") -> list[float]:
    """Completion time (``field``: ``completed_s``, answered, or ``saved_s``, saved by the API) since
    submission of each job with at most ``max_images`` images.

    A job that never completed (images lost, or the time limit hit) counts as the worst there
    is: the time from its submission to the run's limit (``time_limit_s``, else the run's wall
    time), a lower bound on its real latency, never dropped. Cancelled jobs are left out.
    """
    limit = time_limit_s if time_limit_s is not None else report.get("time_limit_s") or report.get("wall_s") or 0.0
    out = []
    for job in report["jobs"]:
        if job["images"] > max_images or job.get("cancelled"):
            continue
        done, sub = job.get(field, job["completed_s"]), job["submitted_s"]
        if done is None or sub is None:
            out.append(round(max(limit, report.get("wall_s") or 0.0) - (sub or 0.0), 3))
        else:
            out.append(round(done - sub, 3))
    return out


def incomplete_small_jobs(report: dict[str, Any], max_images: int) -> int:
    return sum(1 for j in report["jobs"] if j["images"] <= max_images and not j.get("cancelled")
               and j["completed_s"] is None)


def summarize(reports: list[dict[str, Any]], small: int, time_limit_s: float | None = None) -> dict[str, Any]:
    lat = [small_job_latency(r, small, time_limit_s) for r in reports]
    worst_small = [max(run, default=None) for run in lat]
    saved = [small_job_latency(r, small, time_limit_s, "saved_s") for r in reports]
    return {
        "runs": len(reports),
        "makespan_s": _median([r["makespan_s"] for r in reports]),
        "saved_makespan_s": _median([r.get("saved_makespan_s", r["makespan_s"]) for r in reports]),
        "small_jobs_saved_worst_s": _median([max(run, default=None) for run in saved]),
        "api_requests_per_image": _median([_requests_per_image(r) for r in reports]),
        "ideal_makespan_s": _median([r["ideal_makespan_s"] for r in reports]),
        "ideal_makespan_model_s": _median([r.get("ideal_makespan_model_s") for r in reports]),
        "dead_lettered": max(r.get("dead_lettered", 0) for r in reports),
        "small_jobs_incomplete": sum(incomplete_small_jobs(r, small) for r in reports),
        "images_per_s": _median([r["images_per_s"] for r in reports]),
        "redeliveries": _median([r["redeliveries"] for r in reports]),
        "duplicate_results": _median([r["duplicate_results"] for r in reports]),
        "lost": max(r["lost"] for r in reports),
        "max_reserved_idle_s": _median([r["max_reserved_idle_s"] for r in reports]),
        "small_jobs_worst_s": _median(worst_small),
        "small_jobs_per_run_s": lat,
        "startup_s": _median([r["startup_s"] for r in reports]),
    }


def _requests_per_image(report: dict[str, Any]) -> float | None:
    images = sum(j["images"] for j in report["jobs"])
    requests = report.get("api_requests")
    return round(sum(requests.values()) / images, 3) if requests and images else None


def compare(scenario: Scenario, fair_runs: int = 2, drain_runs: int = 3, small: int = 10,
            out_dir: Path | None = None) -> dict[str, Any]:
    base = out_dir or Path(tempfile.mkdtemp(prefix="antenna-compare-"))
    base.mkdir(parents=True, exist_ok=True)
    server = PrefectServer(base / "prefect")
    (base / "prefect").mkdir(exist_ok=True)
    prefect_url = os.environ.get("PREFECT_API_URL") or server.start().api_url
    reports: dict[str, list[dict[str, Any]]] = {"fair-prefect": [], "fair-plain": [], "drain-plain": []}
    plan = [("fair-prefect", "fair", "prefect")] * fair_runs + [("fair-plain", "fair", "plain")] * fair_runs
    plan += [("drain-plain", "drain", "plain")] * drain_runs
    started = time.time()
    try:
        # Interleave repeats (A B C A B C ...) so drift in machine load hits every variant alike.
        order = sorted(range(len(plan)), key=lambda i: (plan[:i].count(plan[i]), i))
        for i in order:
            label, strategy, orchestration = plan[i]
            n = len(reports[label])
            options = BenchOptions(strategy=strategy, orchestration=orchestration,  # type: ignore[arg-type]
                                   out_dir=base / f"{label}-{n}", prefect_api_url=prefect_url,
                                   prefect_server=None if os.environ.get("PREFECT_API_URL") else server)
            reports[label].append(run_bench(scenario, options))
    finally:
        server.stop()
    summary = {label: summarize(rs, small, scenario.time_limit_s) for label, rs in reports.items() if rs}
    fair, plain, drain = summary.get("fair-prefect"), summary.get("fair-plain"), summary.get("drain-plain")
    ratios: dict[str, float | None] = {}
    if fair and drain and drain["images_per_s"]:
        ratios["fair_vs_drain_images_per_s"] = round(fair["images_per_s"] / drain["images_per_s"], 3)
    if fair and fair["ideal_makespan_s"]:
        ratios["fair_makespan_vs_ideal"] = round(fair["makespan_s"] / fair["ideal_makespan_s"], 3)
    if fair and fair.get("ideal_makespan_model_s"):
        ratios["fair_makespan_vs_model_ideal"] = round(fair["makespan_s"] / fair["ideal_makespan_model_s"], 3)
    if drain and drain.get("ideal_makespan_model_s"):
        ratios["drain_makespan_vs_model_ideal"] = round(drain["makespan_s"] / drain["ideal_makespan_model_s"], 3)
    if fair and plain and plain["makespan_s"]:
        ratios["prefect_vs_plain_makespan"] = round(fair["makespan_s"] / plain["makespan_s"], 3)
    if fair and drain and fair["small_jobs_worst_s"] and drain["small_jobs_worst_s"]:
        ratios["drain_vs_fair_small_job_latency"] = round(drain["small_jobs_worst_s"] / fair["small_jobs_worst_s"], 2)
    if fair:
        ratios["fair_max_idle_vs_ack_wait"] = round(fair["max_reserved_idle_s"] / scenario.queue.ack_wait_s, 3)
    if scenario.antenna is not None:
        # Antenna-bound: what counts is saved, not posted (a posted answer may wait minutes in the save queue)
        for name, summ in (("fair", fair), ("plain", plain)):
            if summ and drain and drain.get("saved_makespan_s"):
                ratios[f"{name}_vs_drain_saved_makespan"] = round(summ["saved_makespan_s"] / drain["saved_makespan_s"], 3)
            if summ and drain and summ.get("small_jobs_saved_worst_s") and drain.get("small_jobs_saved_worst_s"):
                ratios[f"drain_vs_{name}_small_job_saved"] = round(
                    drain["small_jobs_saved_worst_s"] / summ["small_jobs_saved_worst_s"], 2)
            if summ and drain and drain.get("api_requests_per_image"):
                ratios[f"{name}_vs_drain_requests_per_image"] = round(
                    summ["api_requests_per_image"] / drain["api_requests_per_image"], 3)
    return {
        "scenario": scenario.name,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "summary": summary,
        "ratios": ratios,
        "reports": reports,
    }


def format_comparison(result: dict[str, Any]) -> str:
    rows = ["variant", "runs", "makespan_s", "saved_makespan_s", "ideal_makespan_s", "ideal_makespan_model_s", "images_per_s",
            "redeliveries", "duplicate_results", "lost", "dead_lettered", "max_reserved_idle_s", "small_jobs_worst_s",
            "small_jobs_saved_worst_s", "api_requests_per_image", "small_jobs_incomplete"]
    labels = list(result["summary"])
    width = 20
    lines = [f"{result['scenario']} on {result['machine']} ({result['date']} UTC, {result['wall_s']} s)", ""]
    lines.append(f"{'':<22}" + "".join(f"{label:>{width}}" for label in labels))
    for key in rows[1:]:
        lines.append(f"{key:<22}" + "".join(f"{str(result['summary'][label].get(key)):>{width}}" for label in labels))
    lines.append("")
    for key, value in result["ratios"].items():
        lines.append(f"{key:<36} {value}")
    return "\n".join(lines)
