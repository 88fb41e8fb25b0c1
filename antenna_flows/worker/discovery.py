"""Discovery: which jobs this worker serves, kept current from Antenna's job list.

Polls ``GET /jobs/`` every ``discovery_interval_s``, and at once (with a few
quick follow-ups) when JetStream announces a new ``job_*`` stream, so a new job
joins the rotation within a fraction of a second without fast polling. A job
that stops being listed is forgotten; its reserved tasks are dropped (nothing
left to answer to). With ``job_ids`` the worker serves only those jobs, and with
``exit_when_done`` it stops once none of them is listed as incomplete.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator

from antenna_flows.antenna_client import AuthError, Rejected, Unavailable
from antenna_flows.jetstream import StreamGone
from antenna_flows.worker.base import JobInfo, wait_for
from antenna_flows.worker.held import State

if TYPE_CHECKING:
    from antenna_flows.worker.core import FairWorker

log = logging.getLogger(__name__)

ADVISORY_FOLLOW_UPS_S = (0.05, 0.2, 0.5)  # polls after a stream-created advisory, until a job joins


def on_new_stream(w: "FairWorker") -> Callable[[int], Awaitable[None]]:
    async def callback(job_id: int) -> None:
        log.debug("worker %s: stream job_%s created, polling jobs now", w.name, job_id)
        w.discover_now.set()

    return callback


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


async def loop(w: "FairWorker") -> None:
    failures = 0
    rng = random.Random()  # each process its own phase, as a real fleet's workers have
    waits = poll_waits(w.settings.discovery_interval_s, rng)
    while not w.stopping.is_set():
        try:
            await discover_once(w)
            failures = 0
            w.ready("discovery")
        except AuthError as exc:
            w.token_rejected(exc)
            return
        except (Unavailable, Rejected) as exc:
            failures += 1
            if failures in (1, 10) or failures % 60 == 0:
                log.warning("worker %s: job discovery failed (%d in a row): %s; serving known jobs", w.name, failures, exc)
        except Exception:  # noqa: BLE001 - discovery must outlive any one failure
            log.exception("worker %s: job discovery crashed; retrying", w.name)
        wait = next(waits)
        if w.jobs and w.transport is not None and not w.transport.announces_jobs:
            # Over REST only polls find new jobs: while busy, poll sooner (idle, the gentle interval holds).
            wait = min(wait, w.settings.busy_discovery_interval_s * rng.uniform(0.75, 1.25))
        if not await wait_for(w.discover_now, wait):
            continue
        # A stream was just created: its job is listed once Antenna has published its tasks.
        for delay in ADVISORY_FOLLOW_UPS_S:
            await asyncio.sleep(delay)
            try:
                if await discover_once(w):
                    break
            except Exception:  # noqa: BLE001 - the regular poll reports failures
                break


async def discover_once(w: "FairWorker") -> int:
    """One poll of Antenna's incomplete jobs; returns how many joined the rotation."""
    assert w.client is not None and w.transport is not None
    wanted = set(w.settings.job_ids)
    joined = 0
    listed = await w.client.list_jobs(sorted(w.served))
    now = w.clock()
    for item in listed:
        if wanted and item.id not in wanted:
            continue
        pipeline = item.pipeline_slug
        if pipeline not in w.served:
            if pipeline not in w.warned_pipelines:
                w.warned_pipelines.add(str(pipeline))
                log.warning("worker %s: job %s has pipeline %r this worker does not serve: left for others",
                            w.name, item.id, pipeline)
            continue
        info = w.jobs.get(item.id)
        if info is None:
            try:
                ack_wait = await w.transport.ack_wait(item.id)
            except StreamGone:
                continue  # listed but no queue yet (CREATED/PENDING), or already gone
            w.jobs[item.id] = JobInfo(item.id, pipeline, item.priority, ack_wait, now)
            w.scheduler.add(item.id, pipeline, item.priority)
            w.ledger.job(item.id, pipeline, item.priority)
            log.info("worker %s: job %s (%s, priority %d, ack_wait %.0fs) joined the rotation",
                     w.name, item.id, pipeline, item.priority, ack_wait)
            w.wake_reserver.set()
            joined += 1
        else:
            info.last_listed = now
            if info.priority != item.priority:
                info.priority = item.priority
                w.scheduler.add(item.id, pipeline, item.priority)
    waiting = w.store.waiting_counts()
    for job_id, info in list(w.jobs.items()):
        if now - info.last_listed > w.settings.idle_forget_s and not waiting.get(job_id):
            await forget(w, job_id, "no longer listed as incomplete")
    if wanted and w.settings.exit_when_done and not wanted & {item.id for item in listed} and not len(w.store):
        w.stop(f"jobs {sorted(wanted)} are done")
    return joined


async def forget(w: "FairWorker", job_id: int, why: str) -> None:
    """The job left the rotation: its waiting tasks have nothing to be answered to."""
    w.jobs.pop(job_id, None)
    w.scheduler.remove(job_id)
    assert w.settler is not None and w.transport is not None
    if not await w.settler.settle(w.store.of_job(job_id, State.RESERVED, State.LOADING, State.READY), State.DROPPED, why):
        log.info("worker %s: job %s left the rotation (%s)", w.name, job_id, why)
    await w.transport.forget(job_id)
