#!/usr/bin/env bash
# Per-request and per-save costs of the real Antenna (see probe_real_antenna.py). Harness set up first.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
HARNESS="${RA_HARNESS:-/work/shared/real-antenna}"
export AF_VENV="${AF_VENV:-$ROOT/.venv}"
source "$HARNESS/env.sh"
export RA_SIM_CATMAP="${RA_SIM_CATMAP:-1}"
"$HARNESS/setup.sh" >/dev/null
exec "$AF_VENV/bin/python" "$HERE/probe_real_antenna.py" "$@"
