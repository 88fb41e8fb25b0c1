"""Small pieces every part of the worker shares: job facts, wake-ups, errors, what an outage is."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import nats.errors

from antenna_flows.antenna_client import Unavailable

TICK_S = 0.25  # parts re-check at least this often (dry jobs come back, redeliveries appear)

# What a part rides out and tries again: Antenna or NATS briefly unreachable. Anything else
# escaping a part is a bug or a state the worker does not understand: the worker stops (see
# core.FairWorker: a failed part fails the worker, loudly, after handing everything back).
OUTAGES: tuple[type[BaseException], ...] = (
    Unavailable,
    nats.errors.Error,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
)


class FatalWorkerError(RuntimeError):
    """The worker cannot go on (wrong token, a part failed): it stops, handing back what it holds."""


class PartFailed(FatalWorkerError):
    """One of the worker's parts died of an unexpected exception."""

    def __init__(self, part: str, cause: BaseException):
        super().__init__(f"worker part {part!r} failed: {type(cause).__name__}: {cause}")
        self.part = part
        self.cause = cause


@dataclass
class JobInfo:
    """A job in the rotation: what discovery learnt of it."""

    job_id: int
    pipeline: str
    priority: int
    ack_wait_s: float
    last_listed: float


@dataclass
class Pulse:
    """Wake-ups between parts: who waits for what (each set by whoever makes it true).

    - ``tasks``: a held task entered, moved or left the store (the store calls it);
    - ``reserve``: room for more reservations (a batch started, a job joined, a stop);
    - ``discover``: JetStream announced a new stream: poll the job list now;
    - ``stopping``: the worker is stopping (set once, never cleared).
    """

    tasks: asyncio.Event = field(default_factory=asyncio.Event)
    reserve: asyncio.Event = field(default_factory=asyncio.Event)
    discover: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def all_awake(self) -> None:
        for event in (self.tasks, self.reserve, self.discover):
            event.set()


async def wait_for(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds (cleared first); True if it fired."""
    event.clear()
    try:
        await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))
        return True
    except asyncio.TimeoutError:
        return False
