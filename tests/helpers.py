"""Small pieces several test modules share: a local HTTP server, a call-counting spy, and how the
worker tests build, run and check workers against a local Antenna (fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Awaitable, Callable, Iterator

from antenna_flows.models.sim import SimModel
from antenna_flows.settings import WorkerSettings
from antenna_flows.worker import FairWorker
from antenna_lab.antenna.admin import AntennaError, AsyncAntennaAdmin


class QuietHTTPServer(ThreadingHTTPServer):
    """A test server that does not print a traceback when a client hangs up mid-answer (the hostile-input
    tests do that on purpose; the worker's side of it is what they assert)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 (a free port) until the generator is closed; yields the base URL."""
    httpd = QuietHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Clock:
    """A fake monotonic clock for pure logic: starts at 1000 s, moves only when a test sets ``t``."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Spy:
    """Wraps a one-argument function and counts its calls."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn, self.calls = fn, 0

    def __call__(self, arg: Any) -> Any:
        self.calls += 1
        return self.fn(arg)


PIPELINE = "sim-panama_moths_2024"  # the sim model serves pipelines of its own


def settings_for(stack: Any, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = dict(
        antenna_api_url=stack.api_url,
        antenna_api_token=stack.token,
        nats_url=stack.nats_url,
        model_kind="sim",
        sim_seconds_per_image=0.005,
        sim_seconds_per_batch=0.005,
        worker_name="test-worker",
        discovery_interval_s=0.2,
        session_idle_s=0.5,
        post_retry_delay_s=0.05,
        release_delay_s=0.05,
        max_batch_size=4,
    )
    values.update(overrides)
    return WorkerSettings(**values)


def worker_for(settings: WorkerSettings) -> FairWorker:
    return FairWorker(settings, SimModel(settings.sim_seconds_per_image, settings.sim_seconds_per_batch))


async def serve_until(workers: list[FairWorker], done: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> list[Any]:
    """Run workers until ``done()``; then stop them gracefully and return what each run returned."""
    runs = [asyncio.create_task(w.run()) for w in workers]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if await done():
                break
            for run in runs:
                if run.done():
                    run.result()  # a worker that died raises here
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("condition not reached in time")
    finally:
        for w in workers:
            w.stop("test done")
        results = await asyncio.gather(*runs, return_exceptions=True)
    return results


def all_answered(aadmin: AsyncAntennaAdmin, *job_ids: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            jobs = [await aadmin.job(j) for j in job_ids]
        except AntennaError:  # an injected outage
            return False
        return all(j.results + j.errors >= j.total for j in jobs)

    return check


# A row of real Antenna's full job list (GET /jobs/?limit=3 on Antenna 731cc2a), as it came: the shape
# JobListItem.from_full_row reads (pipeline nested; total and saved from the progress stages).
REAL_ANTENNA_JOB_ROW: dict[str, Any] = {
    "id": 20,
    "pipeline": {"id": 4, "name": "Simulated (...)", "slug": "sim-quebec_vermont_moths_2023"},
    "status": "STARTED",
    "progress": {
        "summary": {"status": "STARTED", "progress": 0.9667},
        "stages": [
            {"status": "SUCCESS", "progress": 1.0, "key": "collect", "name": "Collect",
             "params": [{"name": "Total Images", "key": "total_images", "category": "default", "value": 10}]},
            {"status": "STARTED", "progress": 0.9, "key": "process", "name": "Process", "params": [
                {"name": "Processed", "key": "processed", "value": 9},
                {"name": "Remaining", "key": "remaining", "value": 1},
                {"name": "Failed", "key": "failed", "value": 0}]},
            {"status": "SUCCESS", "progress": 1.0, "key": "results", "name": "Results", "params": [
                {"name": "Captures", "key": "captures", "value": 10},
                {"name": "Detections", "key": "detections", "value": 10},
                {"name": "Classifications", "key": "classifications", "value": 10}]},
        ],
        "errors": [],
        "logs": [],
    },
    "dispatch_mode": "async_api",
}
