"""The seam between the worker and Prefect: where runs, retries and records come from.

The worker calls an :class:`Orchestrator` for its units of work (an inference session, a
reservation round, a result post, a progress report). :class:`PlainOrchestrator` runs them inline
with asyncio retries; the Prefect implementation (:mod:`antenna_flows.orchestration.prefect`)
makes sessions subflow runs, records reservation rounds and posts a *window* at a time (one
``serve-window`` task run per ``window_s`` of work, :mod:`~antenna_flows.orchestration.windows`)
and reports table artifacts. So Prefect's cost is measured by swapping one object, with every
other line of the worker unchanged. Both retry the same failures through the same loop
(:mod:`~antenna_flows.orchestration.retry`: outages, never a 4xx).

The package is library code: no ``@flow`` or ``@task`` here. The Prefect objects the orchestrator
runs (the ``serve-window`` task, the ``inference-session`` subflow, the table writer) are given to
it by the flow that builds it (``flows/worker.py``), and the registries those objects look their
live work up in (:data:`~antenna_flows.orchestration.windows.WINDOWS`,
:data:`~antenna_flows.orchestration.prefect.SESSIONS`,
:data:`~antenna_flows.orchestration.stopping.STOPPERS`) live here, in modules imported once by
name, never in a flow file Prefect may load a second time by path.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Protocol

from antenna_flows.orchestration.retry import (
    RESERVE_RETRIES,
    RESERVE_RETRY_DELAY_S,
    RETRYABLE,
    backoff_delays,
    is_retryable,
    retry,
    retryable,
)

__all__ = ["Orchestrator", "PlainOrchestrator", "RETRYABLE", "backoff_delays", "is_retryable", "retry", "retryable"]

log = logging.getLogger(__name__)

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
    """No Prefect: the same units of work, run inline with the same retries."""

    name = "plain"

    def __init__(self, reserve_retries: int = RESERVE_RETRIES, post_retries: int = 4, post_retry_delay_s: float = 0.5):
        self.reserve_retries = reserve_retries
        self.post_retries = post_retries
        self.post_retry_delay_s = post_retry_delay_s

    async def session(self, fn: Callable[[], Awaitable[dict[str, Any]]], number: int) -> dict[str, Any]:
        return await fn()

    async def reserve(self, fn: Callable[[dict[int, int]], Awaitable[int]], wants: dict[int, int]) -> int:
        reserved, _ = await retry(lambda: fn(wants), backoff_delays(self.reserve_retries, RESERVE_RETRY_DELAY_S), "reserve")
        return reserved

    async def post(self, fn: Callable[[], Awaitable[None]], label: str, counts: dict[int, int] | None = None) -> None:
        await retry(fn, backoff_delays(self.post_retries, self.post_retry_delay_s), label)

    async def report(self, worker: str, rows: list[dict[str, Any]], totals: dict[str, Any], final: bool) -> None:
        if final:
            log.info("worker %s totals: %s", worker, totals)
