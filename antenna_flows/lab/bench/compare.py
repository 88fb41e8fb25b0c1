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

from antenna_flows.lab.bench.bench import BenchOptions, PrefectServer, Scenario, run_bench


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def small_job_latency(report: dict[str, Any], max_images: int) -> list[float | None]:
    """Completion time since submission of each job with at most ``max_images`` images."""
    out = []
    for job in report["jobs"]:
        if job["images"] <= max_images:
            done, sub = job["completed_s"], job["submitted_s"]
            out.append(None if done is None or sub is None else round(done - sub, 3))
    return out


def summarize(reports: list[dict[str, Any]], small: int) -> dict[str, Any]:
    lat = [small_job_latency(r, small) for r in reports]
    worst_small = [max((v for v in run if v is not None), default=None) for run in lat]
    return {
        "runs": len(reports),
        "makespan_s": _median([r["makespan_s"] for r in reports]),
        "ideal_makespan_s": _median([r["ideal_makespan_s"] for r in reports]),
        "images_per_s": _median([r["images_per_s"] for r in reports]),
        "redeliveries": _median([r["redeliveries"] for r in reports]),
        "duplicate_results": _median([r["duplicate_results"] for r in reports]),
        "lost": max(r["lost"] for r in reports),
        "max_reserved_idle_s": _median([r["max_reserved_idle_s"] for r in reports]),
        "small_jobs_worst_s": _median(worst_small),
        "small_jobs_per_run_s": lat,
        "startup_s": _median([r["startup_s"] for r in reports]),
    }


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
                                   out_dir=base / f"{label}-{n}", prefect_api_url=prefect_url)
            reports[label].append(run_bench(scenario, options))
    finally:
        server.stop()
    summary = {label: summarize(rs, small) for label, rs in reports.items() if rs}
    fair, plain, drain = summary.get("fair-prefect"), summary.get("fair-plain"), summary.get("drain-plain")
    ratios: dict[str, float | None] = {}
    if fair and drain and drain["images_per_s"]:
        ratios["fair_vs_drain_images_per_s"] = round(fair["images_per_s"] / drain["images_per_s"], 3)
    if fair and fair["ideal_makespan_s"]:
        ratios["fair_makespan_vs_ideal"] = round(fair["makespan_s"] / fair["ideal_makespan_s"], 3)
    if fair and plain and plain["makespan_s"]:
        ratios["prefect_vs_plain_makespan"] = round(fair["makespan_s"] / plain["makespan_s"], 3)
    if fair and drain and fair["small_jobs_worst_s"] and drain["small_jobs_worst_s"]:
        ratios["drain_vs_fair_small_job_latency"] = round(drain["small_jobs_worst_s"] / fair["small_jobs_worst_s"], 2)
    if fair:
        ratios["fair_max_idle_vs_ack_wait"] = round(fair["max_reserved_idle_s"] / scenario.queue.ack_wait_s, 3)
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
    rows = ["variant", "runs", "makespan_s", "ideal_makespan_s", "images_per_s", "redeliveries",
            "duplicate_results", "lost", "max_reserved_idle_s", "small_jobs_worst_s"]
    labels = list(result["summary"])
    width = 20
    lines = [f"{result['scenario']} on {result['machine']} ({result['date']} UTC, {result['wall_s']} s)", ""]
    lines.append(f"{'':<22}" + "".join(f"{label:>{width}}" for label in labels))
    for key in rows[1:]:
        lines.append(f"{key:<22}" + "".join(f"{str(result['summary'][label][key]):>{width}}" for label in labels))
    lines.append("")
    for key, value in result["ratios"].items():
        lines.append(f"{key:<36} {value}")
    return "\n".join(lines)
