"""The keepalive: +WPI for every held task before a third of its ``ack_wait`` has passed.

A task reserved, loading, ready, running or posting is ours; NATS would hand it
to someone else after ``ack_wait`` without a sign of life, so each gets ``+WPI``
every ``in_progress_fraction * ack_wait`` (its own job's). Answered tasks are no
longer held: Antenna acks them after its save (see :mod:`.settle`). Over REST
there is no +WPI; the reservation budget alone keeps tasks inside the window.

It runs until the worker has settled its last task (the stop order in
:mod:`.core`): a task waiting for its post must not expire during a stop.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from antenna_flows.transport import Transport
from antenna_flows.worker.held import HELD, TaskStore
from antenna_flows.worker.rotation import Rotation

TICK_S = 0.1  # how often held tasks are checked for a due +WPI


class Keepalive:
    def __init__(self, transport: Transport, store: TaskStore, rotation: Rotation, in_progress_fraction: float,
                 clock: Callable[[], float]):
        self.transport = transport
        self.store = store
        self.rotation = rotation
        self.fraction = in_progress_fraction
        self.clock = clock

    async def run(self) -> None:
        if not self.transport.can_extend:
            return
        while True:
            await asyncio.sleep(TICK_S)
            await self.beat()

    async def beat(self) -> int:
        """Send every due +WPI; returns how many were sent."""
        now = self.clock()
        sent = 0
        for held in self.store.all(*HELD):
            period = self.rotation.ack_wait_s(held.job_id) * self.fraction
            for r in held.reservations():
                if now - max(r.reserved_at, r.touched_at) >= period:
                    r.touched_at = now
                    await self.transport.in_progress(r)
                    sent += 1
        return sent
