#!/usr/bin/env bash
# Issue 17's mix on the real Antenna (../shared/real-antenna, gunicorn, 2 Celery processes, NATS_TASK_TTR 30),
# fair (REST, NATS) against the upstream drain pattern (REST), interleaved, in one sitting.
#   ANTENNA_MIRROR=<git dir of RolnickLab/antenna> AF_VENV=$PWD/.venv bash bench-out/real-antenna/run-sitting.sh [ROUNDS]
# Each run's JSON report lands in $RA_HOME/runs/ and is copied here (sitting-<stamp>/).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROUNDS="${1:-3}"
export NATS_TASK_TTR=30 ANTENNA_SERVER=gunicorn
RA=../shared/real-antenna
OUT="$HERE/sitting-$(date +%m%d-%H%M)"
mkdir -p "$OUT"
MIX=(--jobs 200,200,50,50,10,10 --offsets 0,0,5,5,10,10 --workers 4 --sim-spi 0.25)
for round in $(seq 1 "$ROUNDS"); do
  for variant in "fair nats" "drain rest" "fair rest"; do
    set -- $variant
    echo "== round $round: $1 over $2 ($(uptime | sed 's/.*load/load/'))"
    "$RA/run-mix.sh" "${MIX[@]}" --strategy "$1" --transport "$2" --tag="-sit$round" 2>&1 | grep -E "VERDICT|job .* enqueued|done" | tail -3 || true
    latest=$(ls -t /opt/real-antenna/runs/mix-*.json | head -1)
    cp "$latest" "$OUT/"
  done
done
echo "reports in $OUT"
