"""The stand-in's cost model against the real Antenna: the same mix on both, side by side.

Reads run reports of the real-Antenna harness (``shared/real-antenna/run-mix.sh``, JSON under
``$RA_HOME/runs/``, copies in ``bench-out/real-antenna/``) and bench reports of the same mix as a
stand-in scenario with an ``antenna`` section (``antenna-flows bench --json``), groups both by
(strategy, transport), and prints per group the median over repeats of:

- makespan: the real run's ``elapsed_s`` (every job final, i.e. saved; polled every 2 s) against
  the bench's ``saved_makespan_s`` (the last save);
- small jobs (<= ``--small`` images) saved after their enqueue: ``done_after_enqueue_s`` (final
  state, polled every 2 s) against ``saved_s - submitted_s``;
- requests per image by endpoint: the access log's ``GET /jobs/``, ``POST tasks/``,
  ``POST result/`` against the bench's ``api_requests``;
- redeliveries: the harness's per-job maximum of NATS ``num_redelivered`` (sampled every 2 s),
  summed, against the bench's same sample (``max_redelivered``, every ~0.2 s) and, beside it,
  the cumulative count NATS keeps (``redeliveries``), which the harness does not read.

    python -m antenna_lab.bench.calibration --real bench-out/real-antenna/mix-*.json \\
        --stand-in bench-out/antenna-mix-rest-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ENDPOINTS = ("jobs", "tasks", "result")


def real_figures(report: dict[str, Any], small: int) -> dict[str, Any]:
    """One harness run (run_mix.py's report)."""
    strategy, transport = report["variant"].split("/")[1:3]
    images = sum(j["images"] for j in report["jobs"])
    http = report.get("http", {})
    per_endpoint = {"jobs": 0, "tasks": 0, "result": 0}
    for key, n in http.items():
        endpoint = {"list/": "jobs", "tasks/": "tasks", "result/": "result"}.get(key.split()[1])
        if endpoint:
            per_endpoint[endpoint] += n
    return {
        "group": (strategy, transport),
        "makespan_s": report["elapsed_s"] if report.get("stop_reason") == "all final" else None,
        "small_saved_s": sorted(j["done_after_enqueue_s"] for j in report["jobs"]
                                if j["images"] <= small and j["done_after_enqueue_s"] is not None),
        "requests_per_image": {k: round(v / images, 3) for k, v in per_endpoint.items()},
        "redelivered_sampled": sum(j.get("max_redelivered", 0) for j in report["jobs"]),
        "redeliveries": None,
        "lost": report.get("lost"),
    }


def stand_in_figures(report: dict[str, Any], small: int) -> dict[str, Any]:
    """One bench run of the mix as a stand-in scenario."""
    images = sum(j["images"] for j in report["jobs"])
    requests = report.get("api_requests") or {}
    return {
        "group": (report["strategy"], report.get("transport") or "nats")
        + (("prefect",) if report.get("orchestration") == "prefect" else ()),  # the harness runs plain workers
        "makespan_s": report.get("saved_makespan_s", report["makespan_s"]),
        "small_saved_s": sorted(round(j["saved_s"] - j["submitted_s"], 1) for j in report["jobs"]
                                if j["images"] <= small and j.get("saved_s") is not None),
        "requests_per_image": {k: round(requests.get(k, 0) / images, 3) for k in ENDPOINTS},
        "redelivered_sampled": sum(j.get("max_redelivered", 0) for j in report["jobs"]),
        "redeliveries": report.get("redeliveries"),
        "lost": report.get("lost"),
    }


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over one group's repeats (small jobs: the median of each run's worst and best)."""
    worst = [max(r["small_saved_s"]) if r["small_saved_s"] else None for r in runs]
    best = [min(r["small_saved_s"]) if r["small_saved_s"] else None for r in runs]
    return {
        "runs": len(runs),
        "makespan_s": _median([r["makespan_s"] for r in runs]),
        "small_saved_best_s": _median(best),
        "small_saved_worst_s": _median(worst),
        **{f"req_per_image_{k}": _median([r["requests_per_image"][k] for r in runs]) for k in ENDPOINTS},
        "req_per_image": _median([sum(r["requests_per_image"].values()) for r in runs]),
        "redelivered_sampled": _median([r["redelivered_sampled"] for r in runs]),
        "redeliveries_cumulative": _median([r["redeliveries"] for r in runs]),
        "lost": max((r["lost"] or 0) for r in runs),
    }


def table(real: list[dict[str, Any]], stand_in: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    groups = sorted({r["group"] for r in real} | {r["group"] for r in stand_in})
    out: dict[str, Any] = {}
    lines = []
    rows = ["runs", "makespan_s", "small_saved_best_s", "small_saved_worst_s", "req_per_image",
            "req_per_image_jobs", "req_per_image_tasks", "req_per_image_result", "redelivered_sampled",
            "redeliveries_cumulative", "lost"]
    for group in groups:
        a = summarize([r for r in real if r["group"] == group]) if any(r["group"] == group for r in real) else None
        b = summarize([r for r in stand_in if r["group"] == group]) if any(r["group"] == group for r in stand_in) else None
        name = "/".join(group)
        out[name] = {"real": a, "stand_in": b}
        lines.append(f"{name:<28}{'real Antenna':>14}{'stand-in':>12}{'stand-in/real':>15}")
        for key in rows:
            x, y = (a or {}).get(key), (b or {}).get(key)
            ratio = f"{y / x:.2f}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x else "-"
            lines.append(f"  {key:<26}{_show(x):>14}{_show(y):>12}{ratio:>15}")
        lines.append("")
    return "\n".join(lines), out


def _show(value: Any) -> str:
    return "-" if value is None else str(value)


def bench_reports(data: Any) -> list[dict[str, Any]]:
    """One bench report, or every report of an ``antenna-flows compare --json`` file (its ``reports``)."""
    if isinstance(data, dict) and isinstance(data.get("reports"), dict):
        return [r for runs in data["reports"].values() for r in runs]
    return [data]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", nargs="+", type=Path, default=[], help="harness run reports (run_mix.py JSON)")
    ap.add_argument("--stand-in", nargs="+", type=Path, default=[], help="bench reports (antenna-flows bench --json) or compare files (compare --json)")
    ap.add_argument("--small", type=int, default=10, help="a small job has at most this many images (default 10)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    a = ap.parse_args(argv)
    real = [real_figures(json.loads(p.read_text()), a.small) for p in a.real]
    stand_in = [stand_in_figures(report, a.small) for p in a.stand_in for report in bench_reports(json.loads(p.read_text()))]
    text, data = table(real, stand_in)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
