"""Which failures a Prefect task retries: outages, not refusals."""

from __future__ import annotations

from typing import Any

from antenna_flows.antenna_client import AuthError, Rejected
from antenna_flows.orchestration import RETRYABLE


def retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry 5xx, timeouts and connection errors; never a 4xx (retrying would not change the answer)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if isinstance(exc, (AuthError, Rejected)):
        return False
    return isinstance(exc, RETRYABLE) or exc is None
