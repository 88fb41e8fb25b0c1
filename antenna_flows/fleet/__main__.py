"""``python -m antenna_flows.fleet worker-command <host>``: a GPU host's ``prefect worker start`` line (or ``slots``)."""

from antenna_flows.fleet.spec import main

raise SystemExit(main())
