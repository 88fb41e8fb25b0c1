#!/usr/bin/env bash
# The GPU-bound figures of BENCHMARKS.md re-measured at HEAD (subset of run-figures.sh, ~15 min on 2 cores).
set -u
cd "$(dirname "$0")/.."
AF=.venv/bin/antenna-flows
O=bench-out
run() { echo "== $*"; "$@" > "$O/last.log" 2>&1 || echo "   failed: rc=$? (see $O/last.log)"; tail -8 "$O/last.log" | sed 's/^/   /'; }
run $AF compare --scenario late-small-job --fair-runs 1 --drain-runs 1 --small 8 --json $O/compare-late-head.json
run $AF compare --scenario mix-24-jobs    --fair-runs 1 --drain-runs 1 --json $O/compare-mix-head.json
run $AF compare --scenario gpu-rate       --fair-runs 1 --drain-runs 1 --json $O/compare-gpu-rate-head.json
run $AF bench --scenario soak-20k --strategy fair --orchestration plain --json $O/soak-20k-fair-plain-head.json
echo "== done"
