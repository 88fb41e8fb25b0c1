#!/usr/bin/env bash
# The figures re-measured after the last pacing change (GPU-bound seed and mix, Antenna-bound mixes), ~18 min.
set -u
cd "$(dirname "$0")/.."
TAIL_LINES=12
source bench-out/run-lib.sh
run $AF compare --scenario seed-6-jobs      --fair-runs 2 --drain-runs 2 --json $O/compare-seed-head.json
run $AF compare --scenario mix-24-jobs      --fair-runs 1 --drain-runs 1 --json $O/compare-mix-head.json
run $AF compare --scenario antenna-mix-rest --fair-runs 1 --drain-runs 1 --json $O/compare-antenna-mix-rest.json
run $AF compare --scenario antenna-mix-nats --fair-runs 1 --drain-runs 1 --json $O/compare-antenna-mix-nats.json
run $AF bench --scenario soak-antenna-24k --strategy fair --orchestration plain --json $O/soak-antenna-24k-fair-plain.json
echo "== done"
