"""What the real Antenna charges for a request and for a save, so a scenario can be bound by Antenna.

Antenna serves requests on a few gunicorn workers and saves results on a few Celery processes
(one FIFO queue, ``ml_results``, for every job); on the machines it runs on, both are scarcer
than the GPUs asking. Without a cost model the stand-in answers and saves in microseconds and
the GPU is always the bottleneck; with one (a scenario's ``antenna`` section, see
``shared/bench/README.md``) it is as scarce as the real one, calibrated against it
(``lab/scripts/probe_real_antenna.py``, ``bench-out/real-antenna/``):

- :class:`WebWorkers`: at most ``web_workers`` worker requests are served at once, in arrival
  order (gunicorn's backlog); each holds its web worker for its endpoint's cost (``request_s``;
  a result post ``result + result_per_item * n``) plus whatever the handler itself waits (a
  ``/tasks`` fetch on a job with no task to hand out waits 0.5 s, as Antenna's does: nats-py's
  fetch returns at once with what there is). Time spent waiting for a free worker is part of
  the request's latency.
- saves: ``save_workers`` save workers take results off one FIFO queue, each save holding its
  worker ``save_s_per_result`` (``jobplane.JobPlane``); the ack is published after the save.

The bench's own admin requests are not workers' traffic and take no web worker.

Optionally (``cpu_cores``, an extension of the shared contract), those costs are CPU time on a
machine of that many cores that web workers and save workers share (:class:`Cpu`, processor
sharing): on the real Antenna a fleet that makes more requests slows the saves too, since gunicorn
and Celery run on the same cores. Without it each cost is a fixed delay.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

REQUEST_CLASSES = ("jobs", "tasks", "result", "other")


class RequestCosts(BaseModel):
    """Seconds a request holds a web worker, by endpoint (anything else costs ``jobs``)."""

    model_config = ConfigDict(extra="forbid")

    jobs: float = Field(0.0, ge=0, description="GET /jobs/ (the workers' job discovery)")
    tasks: float = Field(0.0, ge=0, description="POST /jobs/{id}/tasks/, besides its fetch wait")
    result: float = Field(0.0, ge=0, description="POST /jobs/{id}/result/, per request")
    result_per_item: float = Field(0.0, ge=0, description="POST /jobs/{id}/result/, per result in it")


class AntennaCosts(BaseModel):
    """A scenario's ``antenna`` section."""

    model_config = ConfigDict(extra="forbid")

    web_workers: int = Field(2, ge=1, description="requests served at once (gunicorn workers)")
    request_s: RequestCosts = Field(default_factory=RequestCosts)
    save_workers: int = Field(2, ge=1, description="concurrent result saves (Celery processes on ml_results)")
    save_s_per_result: float = Field(0.0, ge=0, description="seconds one save holds a save worker")
    cpu_cores: float | None = Field(
        None, gt=0,
        description="extension: the request and save costs are CPU seconds on this many cores, shared by the busy "
        "web and save workers (processor sharing); None: each cost is a fixed delay",
    )

    def request_cost_s(self, request_class: str) -> float:
        costs = self.request_s
        return {"jobs": costs.jobs, "tasks": costs.tasks, "result": costs.result}.get(request_class, costs.jobs)

    @classmethod
    def load(cls, path: str | Path) -> "AntennaCosts":
        """From a JSON file: the ``antenna`` section itself, or a whole scenario that has one."""
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and "antenna" in data:
            data = data["antenna"]
        return cls.model_validate(data)


class Cpu:
    """Processor sharing on ``cores`` cores: each piece of work under way progresses at
    ``min(1, cores / pieces under way)`` CPU seconds per second, so it ends when it has had its CPU
    seconds. ``cores=None``: every piece takes exactly its seconds (no sharing).

    Event driven: remaining work is brought up to date whenever a piece starts or ends, and one timer
    waits for the next to end (no polling)."""

    def __init__(self, cores: float | None):
        self.cores = cores
        self._work: dict[int, list] = {}  # id -> [remaining CPU seconds, future]
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._ids = 0
        self.busy_s = 0.0  # CPU seconds done (utilisation = busy_s / (cores * wall))

    async def run(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.cores is None:
            await asyncio.sleep(seconds)
            self.busy_s += seconds
            return
        loop = asyncio.get_running_loop()
        self._advance()
        self._ids += 1
        key = self._ids
        future: asyncio.Future[None] = loop.create_future()
        self._work[key] = [seconds, future]
        self._schedule()
        try:
            await future
        finally:
            if key in self._work:  # cancelled: stop charging it
                self._advance()
                del self._work[key]
                self._schedule()

    def _rate(self) -> float:
        n = len(self._work)
        return min(1.0, self.cores / n) if n and self.cores else 1.0

    def _advance(self) -> None:
        now = time.monotonic()
        if self._work:
            done = (now - self._last) * self._rate()
            for piece in self._work.values():
                piece[0] -= done
            self.busy_s += done * len(self._work)
        self._last = now

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._work:
            finished = [k for k, (left, _) in self._work.items() if left <= 1e-6]
            if not finished:
                break
            for k in finished:
                _, future = self._work.pop(k)
                if not future.done():
                    future.set_result(None)
        if self._work:
            wait = min(left for left, _ in self._work.values()) / self._rate()
            self._timer = asyncio.get_running_loop().call_later(max(wait, 0.0), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._advance()
        self._schedule()


class WebWorkers:
    """gunicorn's workers: ``costs.web_workers`` requests at once, the rest wait in arrival order.

    :meth:`serve` holds a worker for the request's base cost and for the handler's own run;
    :meth:`charge` adds a cost only known inside the handler (per result of a post). Statistics per
    endpoint class: requests, time waiting for a worker, time holding one, and the longest backlog.
    """

    def __init__(self, costs: AntennaCosts, cpu: Cpu | None = None):
        self.costs = costs
        self.cpu = cpu or Cpu(costs.cpu_cores)
        self._slots: asyncio.Semaphore | None = None  # made on the serving loop, at first use
        self.waiting = 0
        self.busy = 0
        self.max_waiting = 0
        self.count = dict.fromkeys(REQUEST_CLASSES, 0)
        self.wait_s = dict.fromkeys(REQUEST_CLASSES, 0.0)
        self.held_s = dict.fromkeys(REQUEST_CLASSES, 0.0)
        self.max_wait_s = dict.fromkeys(REQUEST_CLASSES, 0.0)

    @asynccontextmanager
    async def serve(self, request_class: str) -> AsyncIterator[None]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.costs.web_workers)
        arrived = time.monotonic()
        self.waiting += 1
        self.max_waiting = max(self.max_waiting, self.waiting)
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        started = time.monotonic()
        self.busy += 1
        try:
            await self.cpu.run(self.costs.request_cost_s(request_class))
            yield
        finally:
            done = time.monotonic()
            self.busy -= 1
            self._slots.release()
            self.count[request_class] += 1
            self.wait_s[request_class] += started - arrived
            self.max_wait_s[request_class] = max(self.max_wait_s[request_class], started - arrived)
            self.held_s[request_class] += done - started

    def reset_stats(self) -> None:
        """Forget the statistics so far (the bench, at time zero); requests under way are counted when done."""
        self.max_waiting = self.waiting
        self.cpu.busy_s = 0.0
        for table in (self.count, self.wait_s, self.held_s, self.max_wait_s):
            for key in table:
                table[key] = 0 if table is self.count else 0.0

    async def charge(self, seconds: float) -> None:
        """A cost the handler learns of (``result_per_item`` times the results posted), on the held worker."""
        await self.cpu.run(seconds)

    def stats(self) -> dict[str, object]:
        """Per endpoint class: requests, mean and max wait for a web worker, mean time holding one."""
        out: dict[str, object] = {"web_workers": self.costs.web_workers, "max_backlog": self.max_waiting}
        for cls in REQUEST_CLASSES:
            n = self.count[cls]
            out[cls] = {
                "requests": n,
                "mean_wait_s": round(self.wait_s[cls] / n, 4) if n else None,
                "max_wait_s": round(self.max_wait_s[cls], 4) if n else None,
                "mean_held_s": round(self.held_s[cls] / n, 4) if n else None,
            }
        return out
