"""How a worker reaches a job's tasks: straight from NATS JetStream, or through Antenna's REST API.

The worker talks to a :class:`Transport` and never to NATS directly, so a
deployment whose workers cannot reach NATS swaps in :class:`RestTransport`
and keeps the same scheduler, batching and accounting.

- :class:`NatsTransport` binds to Antenna's durable consumers and reserves with
  ``no_wait`` pulls. It can keep a task alive past ``ack_wait`` (+WPI), hand it
  back (nak with delay) or terminate it.
- :class:`RestTransport` reserves through ``POST /jobs/{id}/tasks/`` (Antenna
  fetches for us). It cannot extend or release a reservation, so the worker
  keeps its reservations within the window by budget alone.

Neither can ack: the ack of an answered task is Antenna's, published after it
has saved the result (a failed save is left unacked for NATS to redeliver).
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Protocol

from antenna_flows.antenna_client import AntennaClient, Rejected
from antenna_flows.jetstream import FIRST_CONNECT_S, ConsumerStats, JobQueue, QueueConfig, Reservation, StreamGone, task_problem

log = logging.getLogger(__name__)


class Transport(Protocol):
    name: str
    can_extend: bool  # +WPI and nak are available
    announces_jobs: bool  # new jobs are announced (JetStream advisories), not only found by polling

    async def reserve(self, job_id: int, n: int) -> list[Reservation]:
        """Up to ``n`` tasks available now; ``[]`` if none; raises StreamGone if the job's queue vanished."""
        ...

    async def nak(self, r: Reservation, delay_s: float) -> None: ...

    async def in_progress(self, r: Reservation) -> None: ...

    async def term(self, r: Reservation) -> None:
        """Never redeliver this task (poison: Antenna cannot accept any answer for it)."""
        ...

    async def ack_wait(self, job_id: int) -> float:
        """The job's ack_wait in seconds; raises StreamGone if the job has no queue (yet)."""
        ...

    async def counts(self, job_id: int) -> ConsumerStats | None:
        """The job's consumer counters (delivered, ack pending, ack floor), when this path can read them
        without asking Antenna (NATS); None over REST (the job list's progress tells saves there)."""
        ...

    async def announce(self, worker: str, pipelines: list[str], holding: int | None = None) -> None:
        """Tell the fleet this worker is serving, and what it holds unanswered (NATS roll call); nothing over REST."""
        ...

    async def watch_roll_call(self, callback: Callable[[str, list[str], int | None], None]) -> None:
        """Hear the fleet's announcements (NATS); nothing over REST."""
        ...

    async def watch_new_jobs(self, callback: Callable[[int], Awaitable[None] | None]) -> None: ...

    async def forget(self, job_id: int) -> None: ...

    async def close(self) -> None: ...


class NatsTransport:
    name = "nats"
    can_extend = True
    announces_jobs = True

    def __init__(self, queue: JobQueue):
        self.queue = queue

    @classmethod
    async def connect(cls, url: str, name: str) -> "NatsTransport":
        return cls(await JobQueue.connect(url, QueueConfig(), name=name, first_connect_s=FIRST_CONNECT_S))

    async def reserve(self, job_id: int, n: int) -> list[Reservation]:
        return await self.queue.reserve(job_id, n)

    async def nak(self, r: Reservation, delay_s: float) -> None:
        await self._send(r, "nak", delay_s)

    async def in_progress(self, r: Reservation) -> None:
        await self._send(r, "in_progress")

    async def term(self, r: Reservation) -> None:
        await self._send(r, "term")

    async def _send(self, r: Reservation, what: str, delay_s: float | None = None) -> None:
        if r.msg is None:
            return
        try:
            if what == "nak":
                await r.msg.nak(delay=delay_s)
            elif what == "in_progress":
                await r.msg.in_progress()
            else:
                await r.msg.term()
        except Exception as exc:  # noqa: BLE001 - a lost ack/WPI is recovered by redelivery
            log.warning("job %s: %s of task %s failed: %s", r.job_id, what, r.image_id, exc)

    async def ack_wait(self, job_id: int) -> float:
        return await self.queue.ack_wait(job_id)

    async def counts(self, job_id: int) -> ConsumerStats | None:
        return await self.queue.stats(job_id)

    async def announce(self, worker: str, pipelines: list[str], holding: int | None = None) -> None:
        await self.queue.announce(worker, pipelines, holding)

    async def watch_roll_call(self, callback: Callable[[str, list[str], int | None], None]) -> None:
        await self.queue.watch_roll_call(callback)

    async def watch_new_jobs(self, callback: Callable[[int], Awaitable[None] | None]) -> None:
        await self.queue.watch_new_jobs(callback)

    async def forget(self, job_id: int) -> None:
        await self.queue.forget(job_id)

    async def close(self) -> None:
        await self.queue.close()


class RestTransport:
    """Reserve through Antenna's REST API alone (for workers that cannot reach NATS)."""

    name = "rest"
    can_extend = False
    announces_jobs = False

    def __init__(self, client: AntennaClient, ack_wait_s: float = 30.0):
        self.client = client
        self.ack_wait_s = ack_wait_s

    async def reserve(self, job_id: int, n: int) -> list[Reservation]:
        try:
            tasks = await self.client.reserve_tasks(job_id, n)
        except Rejected as exc:
            if exc.status == 404:
                raise StreamGone(job_id) from exc
            raise
        out = []
        for t in tasks:
            problem = task_problem(t)  # absurd ids: a malformed task, as over NATS
            out.append(Reservation(job_id=job_id, task=None if problem else t, parse_error=problem,
                                   reply_subject=t.reply_subject or "", loose_image_id=None))
        return out

    async def nak(self, r: Reservation, delay_s: float) -> None:
        """No way to hand a task back over REST: it returns to the queue after ack_wait."""

    async def in_progress(self, r: Reservation) -> None:
        """No heartbeat over REST; the reservation budget keeps us within ack_wait."""

    async def term(self, r: Reservation) -> None:
        """Not possible over REST: it comes back after ack_wait until max_deliver."""

    async def ack_wait(self, job_id: int) -> float:
        return self.ack_wait_s

    async def counts(self, job_id: int) -> ConsumerStats | None:
        return None

    async def announce(self, worker: str, pipelines: list[str], holding: int | None = None) -> None:
        """Workers on REST cannot hear each other."""

    async def watch_roll_call(self, callback: Callable[[str, list[str], int | None], None]) -> None:
        """Workers on REST cannot hear each other."""

    async def watch_new_jobs(self, callback: Callable[[int], Awaitable[None] | None]) -> None:
        """No advisories over REST: discovery polls."""

    async def forget(self, job_id: int) -> None:
        pass

    async def close(self) -> None:
        """The API client belongs to the worker, which closes it."""
