"""The seam between the worker and Prefect: where runs, retries and artifacts come from.

The worker calls an :class:`Orchestrator` for its units of work (an inference
session, a reservation round, a result post, a progress report). The Prefect
implementation (``flows/worker.py``) makes sessions subflow runs, records
reservation rounds and posts a *window* at a time (one ``serve-window`` task
run per ``window_s`` of work, each unit retried on its own inside it, so the
record grows with time, not images) and reports table artifacts;
:class:`PlainOrchestrator` runs the same code with plain asyncio retries, so
Prefect's cost is measured by swapping one object, with every other line of
the worker unchanged. Both retry the same failures (:data:`RETRYABLE`, never
a 4xx).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable, Protocol, TypeVar

from antenna_flows.antenna_client import AuthError, Rejected, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE: tuple[type[BaseException], ...] = (Unavailable, asyncio.TimeoutError, ConnectionError, OSError)


def backoff_delays(retries: int, base_s: float, jitter: float = 0.5) -> list[float]:
    """Exponential backoff with multiplicative jitter: base, 2*base, 4*base... each times U(1-j, 1+j)."""
    return [base_s * 2**i * random.uniform(1 - jitter, 1 + jitter) for i in range(retries)]


class Orchestrator(Protocol):
    name: str

    async def session(self, fn: Callable[[], Awaitable[dict[str, Any]]], number: int) -> dict[str, Any]:
        """Run one inference session (a Prefect subflow run)."""
        ...

    async def reserve(self, fn: Callable[[dict[int, int]], Awaitable[int]], wants: dict[int, int]) -> int:
        """Run one reservation round with retries; returns how many tasks were reserved."""
        ...

    async def post(self, fn: Callable[[], Awaitable[None]], label: str, counts: dict[int, int] | None = None) -> None:
        """Post one batch's results with retries (``fn`` is idempotent); raises after the last retry.

        ``counts`` (optional): results per job, for the record (else read from ``label``:
        ``post job 1 x4, job 2 x3``).
        """
        ...

    async def report(self, worker: str, rows: list[dict[str, Any]], totals: dict[str, Any], final: bool) -> None:
        """Publish per-job throughput (Prefect: a table artifact)."""
        ...


class PlainOrchestrator:
    """No Prefect: the same units of work, run inline with asyncio retries."""

    name = "plain"

    def __init__(self, reserve_retries: int = 3, post_retries: int = 4, post_retry_delay_s: float = 0.5):
        self.reserve_retries = reserve_retries
        self.post_retries = post_retries
        self.post_retry_delay_s = post_retry_delay_s

    async def session(self, fn: Callable[[], Awaitable[dict[str, Any]]], number: int) -> dict[str, Any]:
        return await fn()

    async def reserve(self, fn: Callable[[dict[int, int]], Awaitable[int]], wants: dict[int, int]) -> int:
        return await retry(lambda: fn(wants), backoff_delays(self.reserve_retries, 0.1), "reserve")

    async def post(self, fn: Callable[[], Awaitable[None]], label: str, counts: dict[int, int] | None = None) -> None:
        await retry(fn, backoff_delays(self.post_retries, self.post_retry_delay_s), label)

    async def report(self, worker: str, rows: list[dict[str, Any]], totals: dict[str, Any], final: bool) -> None:
        if final:
            log.info("worker %s totals: %s", worker, totals)


def is_retryable(exc: BaseException | None) -> bool:
    """An outage (5xx, timeout, connection error): yes. A 4xx (``AuthError``, ``Rejected``), anything else: no."""
    if exc is None or isinstance(exc, (AuthError, Rejected)):
        return False
    return isinstance(exc, RETRYABLE)


async def retry(fn: Callable[[], Awaitable[T]], delays: list[float], label: str) -> T:
    """Call ``fn``; on a retryable error wait the next delay and call again; re-raise after the last."""
    for attempt, delay in enumerate([*delays, None]):
        try:
            return await fn()
        except RETRYABLE as exc:
            if delay is None or not is_retryable(exc):
                raise
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.2fs", label, attempt + 1, len(delays) + 1, exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
