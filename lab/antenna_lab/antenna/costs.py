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


class WebWorkers:
    """gunicorn's workers: ``costs.web_workers`` requests at once, the rest wait in arrival order.

    :meth:`serve` holds a worker for the request's base cost and for the handler's own run;
    :meth:`charge` adds a cost only known inside the handler (per result of a post). Statistics per
    endpoint class: requests, time waiting for a worker, time holding one, and the longest backlog.
    """

    def __init__(self, costs: AntennaCosts):
        self.costs = costs
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
            cost = self.costs.request_cost_s(request_class)
            if cost > 0:
                await asyncio.sleep(cost)
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
        for table in (self.count, self.wait_s, self.held_s, self.max_wait_s):
            for key in table:
                table[key] = 0 if table is self.count else 0.0

    async def charge(self, seconds: float) -> None:
        """A cost the handler learns of (``result_per_item`` times the results posted), on the held worker."""
        if seconds > 0:
            await asyncio.sleep(seconds)

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
