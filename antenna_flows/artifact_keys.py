"""The keys of the Prefect artifacts this project writes, where writers and readers agree on them.

Workers write ``worker-<name>-jobs`` (per-job throughput), the fleet keeper ``fleet``, the queue
report ``queue-report`` and ``job-<id>-progress``; the queue report reads the workers' tables (who
served a job) and its own previous table (the last reading, for images/s). Artifact keys allow
lowercase letters, digits and dashes only.
"""

from __future__ import annotations

import re

FLEET = "fleet"
QUEUE_REPORT = "queue-report"
WORKER_TABLE = re.compile(r"^worker-(?P<name>[a-z0-9-]+)-jobs$")
WORKER_TABLES_LIKE = "worker-%-jobs"  # the same, as an artifact filter's ``like_``


def worker_table(worker: str) -> str:
    """``worker-<name>-jobs``, the name reduced to what a key allows."""
    return "worker-" + (re.sub(r"[^a-z0-9-]+", "-", worker.lower()).strip("-") or "unnamed") + "-jobs"


def job_progress(job_id: int) -> str:
    return f"job-{job_id}-progress"
