#!/usr/bin/env bash
# Create the work pools prefect.yaml deploys to (idempotent: an existing pool is left as it is).
#   gpu-pool: GPU hosts (fair-worker/gpu-worker, process-jobs/gpu); one work queue per GPU slot
#             (concurrency 1) is created by the fleet-keeper, plus "default" and "adhoc".
#   cpu-pool: the control host (fleet-keeper, queue-report) and sim workers.
# Then: prefect --no-prompt deploy --all
# PREFECT (default: prefect on PATH, else .venv/bin/prefect) and PREFECT_API_URL as for any prefect command.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-$(command -v prefect || echo .venv/bin/prefect)}"
for pool in gpu-pool cpu-pool; do
  if "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool $pool: exists"
  else
    "$PREFECT" work-pool create "$pool" --type process >/dev/null
    echo "work pool $pool: created (process)"
  fi
done
for queue in adhoc; do
  if "$PREFECT" work-queue inspect "$queue" --pool gpu-pool >/dev/null 2>&1; then
    echo "work queue gpu-pool/$queue: exists"
  else
    "$PREFECT" work-queue create "$queue" --pool gpu-pool >/dev/null
    echo "work queue gpu-pool/$queue: created"
  fi
done
