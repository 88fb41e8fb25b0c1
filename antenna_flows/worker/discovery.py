"""Discovery: which jobs this worker serves, kept current from Antenna's job list.

Polls ``GET /jobs/`` at a rate that does not grow with the fleet: every
``discovery_interval_s`` times the fleet size this worker measures (its share of
the jobs' deliveries, :class:`~antenna_flows.pacing.FleetShare`), at a random
phase, so Antenna sees about one poll per interval from 1 worker or 100. Over
NATS it polls at once (with a few quick follow-ups) when JetStream announces a
new ``job_*`` stream, so a new job joins within a fraction of a second without
fast polling. Over REST, while serving jobs, it polls the full list every
``busy_discovery_interval_s`` (fleet-wide, likewise scaled): its rows carry each
job's progress, the saved counts that pace the fleet to Antenna's saves.

A job that stops being listed is forgotten; its reserved tasks are dropped
(nothing left to answer to). With ``job_ids`` the worker serves only those jobs,
and with ``exit_when_done`` it stops once none of them is listed as incomplete.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator

from antenna_flows.antenna_client import AntennaClient, AuthError, Rejected
from antenna_flows.jetstream import StreamGone
from antenna_flows.pacing import SavePacer
from antenna_flows.transport import Transport
from antenna_flows.worker.base import OUTAGES, FatalWorkerError, Pulse, wait_for
from antenna_flows.worker.held import TaskStore
from antenna_flows.worker.rotation import Rotation
from antenna_flows.worker.settle import Settler

log = logging.getLogger(__name__)

ADVISORY_FOLLOW_UPS_S = (0.05, 0.2, 0.5)  # polls after a stream-created advisory, until a job joins
COLD_POLL_S = 2.0  # REST, until the first save rate: each worker reads the jobs' progress this often


@dataclass
class DiscoveryPolicy:
    """What to serve and how often to look (from WorkerSettings)."""

    served: set[str]  # pipeline slugs this worker can run (shared with the worker: pruned at model load)
    job_ids: frozenset[int] = frozenset()
    exit_when_done: bool = False
    interval_s: float = 4.0  # the fleet's: each worker waits this times the fleet size
    busy_interval_s: float = 2.0  # REST, while serving: likewise
    idle_forget_s: float = 20.0
    progress_polls: bool = False  # REST with pacing: poll the full list (saved counts) while serving


def poll_waits(interval_s: float, rng: random.Random) -> Iterator[float]:
    """Waits between polls: the first a random phase in [0, interval), then interval +-25%.

    A fleet started together would otherwise poll in lock-step, and a job submitted just
    after a poll would wait a whole interval for every worker; with random phases the
    first of N workers sees it after interval / (N + 1) on average (over REST, where no
    advisory wakes them), at the same mean request rate.
    """
    yield rng.uniform(0.0, interval_s)
    while True:
        yield interval_s * rng.uniform(0.75, 1.25)


class Discovery:
    def __init__(self, name: str, client: AntennaClient, transport: Transport, rotation: Rotation,
                 store: TaskStore, settler: Settler, policy: DiscoveryPolicy, pulse: Pulse, *,
                 on_polled: Callable[[], None], on_done: Callable[[str], None],
                 on_fatal: Callable[[BaseException], None], rng: random.Random | None = None,
                 fleet_size: Callable[[], float] = lambda: 1.0, pacer: SavePacer | None = None):
        self.name = name
        self.client = client
        self.transport = transport
        self.rotation = rotation
        self.store = store
        self.settler = settler
        self.policy = policy
        self.pulse = pulse
        self.on_polled = on_polled  # the first successful poll makes the worker ready
        self.on_done = on_done  # exit_when_done: the named jobs are done
        self.on_fatal = on_fatal
        self.rng = rng or random.Random()  # each process its own phase, as a real fleet's workers have
        self.fleet_size = fleet_size
        self.pacer = pacer
        self.warned_pipelines: set[str] = set()

    def on_new_stream(self) -> Callable[[int], Awaitable[None]]:
        async def callback(job_id: int) -> None:
            log.debug("worker %s: stream job_%s created, polling jobs now", self.name, job_id)
            self.pulse.discover.set()

        return callback

    async def run(self) -> None:
        failures = 0
        waits = poll_waits(self.policy.interval_s, self.rng)
        while not self.pulse.stopping.is_set():
            try:
                await self.poll()
                failures = 0
                self.on_polled()
            except AuthError as exc:
                self.on_fatal(FatalWorkerError(f"Antenna rejected the worker's token: {exc}"))
                return
            except (Rejected, *OUTAGES) as exc:
                failures += 1
                if failures in (1, 10) or failures % 60 == 0:
                    log.warning("worker %s: job discovery failed (%d in a row): %s; serving known jobs",
                                self.name, failures, exc)
            fleet = max(1.0, self.fleet_size())
            wait = next(waits) * fleet
            if len(self.rotation) and not self.transport.announces_jobs:
                # Over REST only polls find new jobs (and read saves): while busy, the fleet polls sooner,
                # and each worker at its own pace until it has seen Antenna save (the pacer's first rate).
                cold = self.policy.progress_polls and self.pacer is not None and self.pacer.save_rate() is None
                busy = COLD_POLL_S if cold else self.policy.busy_interval_s * fleet
                wait = min(wait, busy * self.rng.uniform(0.75, 1.25))
            if not await wait_for(self.pulse.discover, wait) or self.pulse.stopping.is_set():
                continue
            # A stream was just created: its job is listed once Antenna has published its tasks.
            for delay in ADVISORY_FOLLOW_UPS_S:
                await asyncio.sleep(delay)
                try:
                    if await self.poll():
                        break
                except (AuthError, Rejected, *OUTAGES):  # the regular poll reports failures
                    break

    async def poll(self) -> int:
        """One poll of Antenna's incomplete jobs; returns how many joined the rotation."""
        wanted = self.policy.job_ids
        joined = 0
        progress = self.policy.progress_polls and len(self.rotation) > 0
        listed = await self.client.list_jobs(sorted(self.policy.served), progress=progress)
        for item in listed:
            if item.saved is not None and self.pacer is not None and item.id in self.rotation:
                self.pacer.saved(item.id, item.saved)
            if wanted and item.id not in wanted:
                continue
            pipeline = item.pipeline_slug
            if pipeline not in self.policy.served:
                if str(pipeline) not in self.warned_pipelines:
                    self.warned_pipelines.add(str(pipeline))
                    log.warning("worker %s: job %s has pipeline %r this worker does not serve: left for others",
                                self.name, item.id, pipeline)
                continue
            if item.id in self.rotation:
                self.rotation.listed(item.id, item.priority)
                continue
            try:
                ack_wait = await self.transport.ack_wait(item.id)
            except StreamGone:
                continue  # listed but no queue yet (CREATED/PENDING), or already gone
            self.rotation.join(item.id, pipeline, item.priority, ack_wait)
            log.info("worker %s: job %s (%s, priority %d, ack_wait %.0fs) joined the rotation",
                     self.name, item.id, pipeline, item.priority, ack_wait)
            self.pulse.reserve.set()
            joined += 1
        now = self.rotation.clock()
        if self.pacer is not None:
            listed_ids = {item.id for item in listed}
            for job_id in self.rotation:
                if job_id not in listed_ids:
                    self.pacer.forget(job_id)  # complete or cancelled: nothing of it is in flight any more
        waiting = self.store.waiting_counts()
        for job_id, info in list(self.rotation.jobs.items()):
            if now - info.last_listed > self.policy.idle_forget_s and not waiting.get(job_id):
                await self.forget(job_id, "no longer listed as incomplete")
        if wanted and self.policy.exit_when_done and not wanted & {i.id for i in listed} and not len(self.store):
            self.on_done(f"jobs {sorted(wanted)} are done")
        return joined

    async def forget(self, job_id: int, why: str) -> None:
        """The job left the rotation (not listed, or its stream vanished): drop what waits for it."""
        self.rotation.leave(job_id)
        if self.pacer is not None:
            self.pacer.forget(job_id)
        if not await self.settler.drop_job(job_id, why):
            log.info("worker %s: job %s left the rotation (%s)", self.name, job_id, why)
        await self.transport.forget(job_id)
