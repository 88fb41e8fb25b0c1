#!/usr/bin/env bash
# Every figure of BENCHMARKS.md, in one sequential run on a quiet machine (2 cores here).
# Usage: bash bench-out/run-figures.sh   (from the repository root, after `make setup`)
set -u
cd "$(dirname "$0")/.."
TAIL_LINES=4
source bench-out/run-lib.sh
run $AF compare --scenario seed-6-jobs    --fair-runs 3 --drain-runs 3 --json $O/compare-seed.json
run $AF compare --scenario late-small-job --fair-runs 2 --drain-runs 3 --small 8 --json $O/compare-late.json
run $AF compare --scenario mix-24-jobs    --fair-runs 1 --drain-runs 1 --json $O/compare-mix.json
run $AF compare --scenario gpu-rate       --fair-runs 2 --drain-runs 1 --json $O/compare-gpu-rate.json
for t in nats rest; do
  run $AF bench --scenario seed-6-jobs      --strategy fair --orchestration plain --transport $t --json $O/seed-fair-$t.json
  run $AF bench --scenario mix-24-jobs      --strategy fair --orchestration plain --transport $t --json $O/mix-fair-$t.json
  run $AF bench --scenario seed-save-errors --strategy fair --orchestration plain --transport $t --json $O/seed-save-errors-$t.json
  run $AF bench --scenario seed-slow-saves  --strategy fair --orchestration plain --transport $t --json $O/seed-slow-saves-$t.json
done
run $AF bench --scenario rollover --strategy fair --orchestration plain   --json $O/rollover-fair-plain.json
run $AF bench --scenario rollover --strategy fair --orchestration prefect --json $O/rollover-fair-prefect.json
run $AF bench --scenario soak-20k --strategy fair --orchestration prefect --json $O/soak-20k-fair-prefect.json
run $AF bench --scenario soak-20k --strategy fair --orchestration plain   --json $O/soak-20k-fair-plain.json
run $AF faults --json $O/faults-fair-plain.json
run $AF faults --orchestration prefect --json $O/faults-fair-prefect.json
run $AF faults --strategy drain --json $O/faults-drain.json
echo "== done"
