#!/usr/bin/env bash
# The GPU-bound figures of BENCHMARKS.md re-measured at HEAD (subset of run-figures.sh, ~15 min on 2 cores).
set -u
cd "$(dirname "$0")/.."
TAIL_LINES=8
source bench-out/run-lib.sh
run $AF compare --scenario late-small-job --fair-runs 1 --drain-runs 1 --small 8 --json $O/compare-late-head.json
run $AF compare --scenario mix-24-jobs    --fair-runs 1 --drain-runs 1 --json $O/compare-mix-head.json
run $AF compare --scenario gpu-rate       --fair-runs 1 --drain-runs 1 --json $O/compare-gpu-rate-head.json
run $AF bench --scenario soak-20k --strategy fair --orchestration plain --json $O/soak-20k-fair-plain-head.json
echo "== done"
