"""Small pieces every loop of the worker shares."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

TICK_S = 0.25  # loops re-check at least this often (dry jobs come back, redeliveries appear)


class FatalWorkerError(RuntimeError):
    """The worker cannot go on (wrong token): it stops, releasing what it holds."""


@dataclass
class JobInfo:
    """A job in the rotation: what discovery learnt of it."""

    job_id: int
    pipeline: str
    priority: int
    ack_wait_s: float
    last_listed: float


async def wait_for(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds (cleared first); True if it fired."""
    event.clear()
    try:
        await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))
        return True
    except asyncio.TimeoutError:
        return False
