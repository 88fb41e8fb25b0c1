"""Building worker parts by hand on real NATS, for the tests of one part at a time.

A real job stream (Antenna's layout, made with the lab's JobStreams on the session's
nats-server), real reservations through :class:`NatsTransport`, a real store,
ledger and settler: what a part does to a task is read back from NATS itself.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any, Coroutine

from antenna_flows.accounting import Ledger
from antenna_flows.jetstream import JobQueue, QueueConfig, Reservation
from antenna_flows.schemas import PipelineProcessingTask
from antenna_flows.transport import NatsTransport
from antenna_flows.worker.held import TaskStore
from antenna_flows.worker.settle import Settler
from antenna_lab.antenna.streams import JobStreams

_job_ids = itertools.count(70_000)  # clear of other tests' job ids on the shared nats-server


def tasks(n: int, url: str = "http://127.0.0.1:9/{}.jpg") -> list[PipelineProcessingTask]:
    return [PipelineProcessingTask(id=str(i), image_id=str(i), image_url=url.format(i)) for i in range(1, n + 1)]


@dataclass
class Bench:
    """One job's stream with ``n`` tasks, and a worker's transport, store, ledger and settler over it."""

    job_id: int
    streams: JobStreams
    transport: NatsTransport
    store: TaskStore = field(default_factory=TaskStore)
    ledger: Ledger = field(default_factory=lambda: Ledger(worker="t"))
    fatal: list[BaseException] = field(default_factory=list)
    spawned: list[asyncio.Task[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.settler = Settler("t", self.store, self.ledger, self.transport, release_delay_s=0.05,
                               on_fatal=self.fatal.append)

    async def reserve(self, n: int) -> list[Reservation]:
        return await self.transport.reserve(self.job_id, n)

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        self.spawned.append(asyncio.create_task(work, name=name))

    async def stats(self) -> Any:
        return await self.transport.queue.stats(self.job_id)

    async def close(self) -> None:
        await asyncio.gather(*self.spawned, return_exceptions=True)
        await self.transport.close()
        await self.streams.delete_job(self.job_id)


async def bench(nats_url: str, n: int, ack_wait_s: float = 1.0, max_deliver: int = 5,
                task_list: list[PipelineProcessingTask] | None = None) -> Bench:
    streams = await JobStreams.connect(nats_url, QueueConfig(ack_wait_s=ack_wait_s, max_deliver=max_deliver,
                                                             max_ack_pending=1000), name="test-antenna")
    job_id = next(_job_ids)
    await streams.delete_job(job_id)
    await streams.create_job(job_id)
    await streams.publish_tasks(job_id, task_list or tasks(n))
    transport = NatsTransport(await JobQueue.connect(nats_url, QueueConfig(), name="test-worker"))
    return Bench(job_id, streams, transport)


async def add_job(b: Bench, task_list: list[PipelineProcessingTask]) -> int:
    """A further job's stream beside ``b``'s (same queue settings, reserved through ``b.transport``), for
    parts that serve several jobs at once; the test deletes it with ``b.streams.delete_job``."""
    job_id = next(_job_ids)
    await b.streams.delete_job(job_id)
    await b.streams.create_job(job_id)
    await b.streams.publish_tasks(job_id, task_list)
    return job_id
