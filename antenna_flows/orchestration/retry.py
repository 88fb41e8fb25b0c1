"""Which failures are retried, and the one retry loop every unit of work goes through.

Outages are retried (a 5xx ``Unavailable``, timeouts, connection errors), refusals never (a 4xx:
``AuthError``, ``Rejected``), and nothing else either: a bug retried is a bug hidden. The same rule
serves three places: :func:`retry` (plain runs, and every unit inside a ``serve-window`` task run),
and :func:`retryable`, Prefect's ``retry_condition_fn`` for a task that uses Prefect's own retries.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable, TypeVar

from antenna_flows.antenna_client import AuthError, Rejected, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

RESERVE_RETRIES = 3  # a reservation round: 3 retries from 0.1 s (posts: settings.post_retries, post_retry_delay_s)
RESERVE_RETRY_DELAY_S = 0.1

RETRYABLE: tuple[type[BaseException], ...] = (Unavailable, asyncio.TimeoutError, ConnectionError, OSError)


def is_retryable(exc: BaseException | None) -> bool:
    """An outage (5xx, timeout, connection error): yes. A 4xx (``AuthError``, ``Rejected``), anything else: no."""
    if exc is None or isinstance(exc, (AuthError, Rejected)):
        return False
    return isinstance(exc, RETRYABLE)


def backoff_delays(retries: int, base_s: float, jitter: float = 0.5) -> list[float]:
    """Exponential backoff with multiplicative jitter: base, 2*base, 4*base... each times U(1-j, 1+j)."""
    return [base_s * 2**i * random.uniform(1 - jitter, 1 + jitter) for i in range(retries)]


async def retry(fn: Callable[[], Awaitable[T]], delays: list[float], label: str) -> tuple[T, int]:
    """Call ``fn``; on an outage wait the next delay and call again. Returns (result, retries taken).

    The last failure, or one not worth retrying, is re-raised as it is (callers settle tasks by its
    type), carrying ``retries_taken`` for the record.
    """
    retries = 0
    for delay in [*delays, None]:
        try:
            return await fn(), retries
        except Exception as exc:
            if delay is None or not is_retryable(exc):
                try:
                    exc.retries_taken = retries  # type: ignore[attr-defined]
                except AttributeError:  # an exception type with __slots__
                    pass
                raise
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.2fs", label, retries + 1, len(delays) + 1, exc, delay)
            retries += 1
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


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
