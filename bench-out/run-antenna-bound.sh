#!/usr/bin/env bash
# Issue 17's stand-in figures (the Antenna-bound regime) and the GPU-bound re-check, in one sequential run.
# Usage: bash bench-out/run-antenna-bound.sh   (repository root, after `make setup`; ~25 min on 2 cores)
set -u
cd "$(dirname "$0")/.."
TAIL_LINES=6
source bench-out/run-lib.sh
run $AF compare --scenario seed-6-jobs       --fair-runs 2 --drain-runs 2 --json $O/compare-seed-head.json
run $AF compare --scenario antenna-mix-rest  --fair-runs 1 --drain-runs 2 --json $O/compare-antenna-mix-rest.json
run $AF compare --scenario antenna-mix-nats  --fair-runs 1 --drain-runs 1 --json $O/compare-antenna-mix-nats.json
run $AF bench --scenario soak-antenna-24k --strategy fair --orchestration plain --json $O/soak-antenna-24k-fair-plain.json
echo "== done"
