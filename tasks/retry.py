"""Which failures are retried: outages, not refusals, and nothing else.

One rule wherever retries happen (``antenna_flows.orchestration.is_retryable``):
inside a ``serve-window`` task run each unit of work retries on it, plain runs
retry on it, and :func:`retryable` is the same rule as a Prefect
``retry_condition_fn`` for tasks that use Prefect's own retries: 5xx,
timeouts and connection errors are retried; a 4xx (``AuthError``,
``Rejected``), any other exception, or a state holding none, never.
"""

from __future__ import annotations

from typing import Any

from antenna_flows.orchestration import is_retryable

__all__ = ["is_retryable", "retryable"]


def _exception_of(state: Any) -> BaseException | None:
    """The exception a failed Prefect state holds, without raising it; ``None`` when it holds none."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    # A result record (persisted or not) wraps the exception in ``.result``.
    # (``state.result()`` is not called: in an async task it returns a coroutine.)
    inner = getattr(data, "result", None)
    return inner if isinstance(inner, BaseException) else None


def retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is an outage (fails closed)."""
    return is_retryable(_exception_of(state))
