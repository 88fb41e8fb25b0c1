"""The fault table: each bundled fault scenario against the same mix run without a fault.

Every ``faults-*`` scenario is the same small mix (3 workers, 770 images in 4
jobs, ack_wait 4 s, max_deliver 3) with one fault at 3-4 s; ``faults-none`` is
the mix alone. For each, one row:

- lost, dead-lettered, duplicates, redeliveries: from its bench report;
- time to recover: from the fault until the answer rate (1 s bins, from the
  API's first-answer times) is back to ``RECOVERED`` of the no-fault run's
  steady rate (2 s moving mean), 0 when it never dipped; ``-`` when it never got
  back before the work ran out, or the scenario has no timed fault (bad images);
- throughput vs no fault: images per second over the no-fault run's.

    python -m antenna_lab.bench.faults [--strategy fair] [--orchestration plain] [--only NAME ...] [--json OUT]

``faults-prefect-down`` needs ``--orchestration prefect`` and is skipped
otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from antenna_lab.bench.bench import BenchOptions, Scenario, run_bench

SCENARIOS_DIR = Path(__file__).parent / "scenarios"
BASELINE = "faults-none"
FAULT_SCENARIOS = [
    "faults-kill", "faults-kill-restart", "faults-nats-restart", "faults-api-503", "faults-slow-api",
    "faults-bad-images", "faults-cancel", "faults-save-errors", "faults-slow-saves", "faults-prefect-down",
]
RECOVERED = 0.75  # share of the no-fault run's steady answer rate that counts as recovered
DIP_WINDOW_S = 3  # a fault that does not dent the rate within this many seconds costs no recovery


def steady_rate(per_s: list[int]) -> float:
    """Median answers per second over the run's full seconds (the first and the last are partial)."""
    inner = per_s[1:-1] or per_s
    return float(statistics.median(inner)) if inner else 0.0


def time_to_recover(per_s: list[int], fault_at_s: float, reference: float) -> float | None:
    """Seconds from the fault until the answer rate is back to ``RECOVERED * reference``.

    The rate is a 2 s moving mean of the per-second answers (results go out a batch at a time).
    0.0 when it did not fall below that within ``DIP_WINDOW_S`` of the fault; None when it never
    got back before the run's last full second.
    """
    if not per_s or reference <= 0:
        return None
    threshold = RECOVERED * reference
    last_full = len(per_s) - 1  # the last bin is partial: the work ran out inside it

    def rate(k: int) -> float:
        return (per_s[k] + per_s[k + 1]) / 2

    start = int(fault_at_s)
    dip = next((k for k in range(start, min(start + DIP_WINDOW_S, last_full - 1)) if rate(k) < threshold), None)
    if dip is None:
        return 0.0
    back = next((k for k in range(dip + 1, last_full - 1) if rate(k) >= threshold), None)
    return None if back is None else round(max(0.0, back - fault_at_s), 1)


def fault_row(name: str, report: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    faults = [f for f in report.get("faults") or () if f.get("action") != "restart_worker"]
    at = faults[0]["at_s"] if faults else 0.0
    ref = steady_rate(baseline.get("answers_per_s") or [])
    base_ips = baseline.get("images_per_s") or 0.0
    return {
        "scenario": name,
        "lost": report["lost"],
        "dead_lettered": report.get("dead_lettered", 0),
        "duplicates": report["duplicate_results"],
        "redeliveries": report["redeliveries"],
        "errors": report["errors"],
        "time_to_recover_s": time_to_recover(report.get("answers_per_s") or [], at, ref) if faults else None,
        "images_per_s": report["images_per_s"],
        "throughput_vs_no_fault": round(report["images_per_s"] / base_ips, 3) if base_ips else None,
        "makespan_s": report["makespan_s"],
        "fault_errors": [f["error"] for f in faults if f.get("error")],
    }


def run_faults(names: list[str] | None = None, strategy: str = "fair", orchestration: str = "plain",
               out_dir: Path | None = None) -> dict[str, Any]:
    base = out_dir or Path(tempfile.mkdtemp(prefix="antenna-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    names = names or FAULT_SCENARIOS
    if orchestration != "prefect":
        names = [n for n in names if n != "faults-prefect-down"]
    started = time.time()

    def bench(name: str) -> dict[str, Any]:
        scenario = Scenario.load(SCENARIOS_DIR / f"{name}.json")
        options = BenchOptions(strategy=strategy, orchestration=orchestration,  # type: ignore[arg-type]
                               out_dir=base / name)
        return run_bench(scenario, options)

    baseline = bench(BASELINE)
    reports = {BASELINE: baseline}
    rows = []
    for name in names:
        reports[name] = bench(name)
        rows.append(fault_row(name, reports[name], baseline))
    return {"strategy": strategy, "orchestration": orchestration,
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), "wall_s": round(time.time() - started, 1),
            "baseline": {"images_per_s": baseline["images_per_s"], "makespan_s": baseline["makespan_s"],
                         "steady_answers_per_s": steady_rate(baseline.get("answers_per_s") or [])},
            "rows": rows, "reports": reports}


def format_faults(result: dict[str, Any]) -> str:
    b = result["baseline"]
    lines = [f"faults ({result['strategy']}, {result['orchestration']}; {result['date']} UTC, {result['wall_s']} s); "
             f"no-fault run: {b['images_per_s']} images/s, makespan {b['makespan_s']} s",
             "",
             f"{'scenario':<22} {'lost':>5} {'dead-lettered':>13} {'duplicates':>10} {'redeliveries':>12} "
             f"{'recover_s':>9} {'vs no fault':>11}"]
    for r in result["rows"]:
        rec = "-" if r["time_to_recover_s"] is None else f"{r['time_to_recover_s']:.1f}"
        ratio = "-" if r["throughput_vs_no_fault"] is None else f"{r['throughput_vs_no_fault']:.2f}x"
        lines.append(f"{r['scenario']:<22} {r['lost']:>5} {r['dead_lettered']:>13} {r['duplicates']:>10} "
                     f"{r['redeliveries']:>12} {rec:>9} {ratio:>11}"
                     + (f"  (not injected: {'; '.join(r['fault_errors'])})" if r["fault_errors"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m antenna_lab.bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["fair", "drain"], default="fair")
    parser.add_argument("--orchestration", choices=["prefect", "plain"], default="plain")
    parser.add_argument("--only", nargs="*", default=None, metavar="NAME", help="Run only these fault scenarios.")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json")
    parser.add_argument("--out-dir", type=Path, default=None, help="Keep each run's logs and metrics here.")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_faults(args.only, args.strategy, args.orchestration, args.out_dir)
    print(format_faults(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["lost"] == 0 for r in result["rows"]) else 3


if __name__ == "__main__":
    sys.exit(main())
