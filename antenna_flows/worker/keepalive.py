"""The heartbeat: +WPI for every held task before a third of its ``ack_wait`` has passed.

A task reserved, loading, ready, running or posting is ours; NATS would hand it
to someone else after ``ack_wait`` without a sign of life, so each gets ``+WPI``
every ``in_progress_fraction * ack_wait`` (its own job's). Answered tasks are no
longer held: Antenna acks them after its save (see :mod:`.settle`). Over REST
there is no heartbeat; the reservation budget alone keeps tasks inside the window.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from antenna_flows.worker.held import State

if TYPE_CHECKING:
    from antenna_flows.worker.core import FairWorker

HEARTBEAT_TICK_S = 0.1  # how often held tasks are checked for a due +WPI
HELD = (State.RESERVED, State.LOADING, State.READY, State.RUNNING, State.POSTING)


async def loop(w: "FairWorker") -> None:
    assert w.transport is not None
    if not w.transport.can_extend:
        return
    while True:
        await asyncio.sleep(HEARTBEAT_TICK_S)
        await beat(w)


async def beat(w: "FairWorker") -> int:
    """Send every due +WPI; returns how many were sent."""
    assert w.transport is not None
    now = w.clock()
    sent = 0
    for held in w.store.all(*HELD):
        period = w.ack_wait_s(held.job_id) * w.settings.in_progress_fraction
        for r in held.reservations():
            if now - max(r.reserved_at, r.touched_at) >= period:
                r.touched_at = now
                await w.transport.in_progress(r)
                sent += 1
    return sent
