"""The fleet keeper's pass: compare the fleet spec with the worker runs Prefect has, and fix the difference.

For each slot of the spec (:mod:`antenna_flows.fleet.spec`):

- its Prefect work queue exists in the deployment's pool with concurrency 1 (a GPU never runs two
  workers, whatever the number of runs: a second one waits in that Prefect work queue);
- a run that is Running but whose process is gone (no ``prefect.flow-run.heartbeat`` event for
  ``stale_after_s`` although it sent some before: its host died) is marked Crashed;
- if no run of the slot is alive (Scheduled, Pending, Running, Paused, Cancelling), one is created
  (``run_deployment(timeout=0)``, tags ``fleet`` and ``fleet-slot:<slot>``, on the slot's Prefect work queue);
- extra runs of a slot that are only waiting (Scheduled) behind a live one are cancelled;
- a slot whose runs keep failing at start (Crashed/Failed within a minute, twice or more in a row)
  waits 30 s, 60 s, ... up to 10 minutes between tries instead of crash-looping.

Runs whose process was killed are marked Crashed by the Prefect worker that started them (the process
exits without a final state), so the next pass replaces them. Slots that left the spec are left alone
(stop their runs by hand: cancelling a run of a slot still in the spec gets it replaced).

Two halves: :func:`plan_slot` decides what to do with one slot, a pure function of what Prefect said
about it (:class:`SlotState`) and the time; :class:`Keeper` reads that from Prefect and carries the
plan out (nothing is changed in a dry run).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import Cancelled, Crashed

from antenna_flows.fleet.spec import FLEET_TAG, Fleet, Slot, slot_of

log = logging.getLogger(__name__)

ALIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
HEARTBEAT_LOOKBACK = dt.timedelta(days=1)  # a run silent longer than this counts as one that never sent any
SHORT_RUN_S = 60.0  # a run that ends this soon after starting, Crashed or Failed, is a failed start
BACKOFF_FIRST_S = 30.0
BACKOFF_MAX_S = 600.0
BACKOFF_LOOKBACK = 8


@dataclass
class SlotReport:
    """One row of the keeper's ``fleet`` artifact."""

    slot: str
    deployment: str
    run: str = ""
    state: str = ""
    action: str = "ok"
    heartbeat_age_s: float | None = None
    detail: str = ""

    def note(self, text: str) -> None:
        self.detail = f"{self.detail}; {text}" if self.detail else text

    def row(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "deployment": self.deployment,
            "run": self.run,
            "state": self.state,
            "heartbeat_age_s": None if self.heartbeat_age_s is None else round(self.heartbeat_age_s, 1),
            "action": self.action,
            "detail": self.detail,
        }


@dataclass
class KeeperResult:
    slots: list[SlotReport] = field(default_factory=list)
    started: int = 0
    crashed: int = 0
    cancelled: int = 0
    errors: int = 0

    def totals(self) -> dict[str, int]:
        return {
            "slots": len(self.slots),
            "started": self.started,
            "marked_crashed": self.crashed,
            "cancelled_duplicates": self.cancelled,
            "errors": self.errors,
        }


# --- deciding (pure) -----------------------------------------------------------------------------


@dataclass
class SlotState:
    """What Prefect says about one slot."""

    slot: Slot
    alive: list[FlowRun]  # its alive runs, oldest first
    heartbeats: dict[UUID, dt.datetime | None]  # the last heartbeat (within a day) of each Running run
    history: list[FlowRun]  # its newest runs in any state, newest first


@dataclass
class SlotPlan:
    """What to do with one slot (and its row in the report)."""

    report: SlotReport
    crash: list[tuple[FlowRun, float]] = field(default_factory=list)  # host gone: (run, seconds since its heartbeat)
    cancel: list[FlowRun] = field(default_factory=list)  # duplicates waiting behind the live run
    start: bool = False  # no live run and no backoff: start one
    previous: FlowRun | None = None  # the slot's last run, which the new one replaces


def stale_verdict(run: FlowRun, last_beat: dt.datetime | None, now: dt.datetime,
                  stale_after_s: float) -> tuple[bool, float | None]:
    """Is ``run``'s process gone? (stale, seconds since its last heartbeat when that matters).

    Stale: Running for at least ``stale_after_s``, heartbeats seen in the last day, none in the last
    ``stale_after_s``. A run that never sent a heartbeat (heartbeats off, or the events service not
    keeping them) is never called stale: marking a live worker Crashed would put a second worker on
    its GPU.
    """
    if stale_after_s <= 0 or run.state is None or run.state.type != StateType.RUNNING:
        return False, None
    age = None if last_beat is None else (now - last_beat).total_seconds()
    if age is not None and age <= stale_after_s:
        return False, age
    running_since = run.state.timestamp or run.start_time or now
    if (now - running_since).total_seconds() < stale_after_s or age is None:
        return False, None
    return True, age


def backoff_s(runs: list[FlowRun], now: dt.datetime) -> tuple[float, int]:
    """Seconds still to wait before the slot's next run, and how many short failures in a row led there.

    A run that Crashed or Failed within SHORT_RUN_S of its start (a host without the checkout, a
    missing weight, a bad parameter) counts; two or more in a row double the wait from
    BACKOFF_FIRST_S up to BACKOFF_MAX_S, so a broken slot costs a run every few minutes, not every
    few seconds (each crash would otherwise trigger the keeper at once).
    """
    short = 0
    for run in runs:
        state = run.state
        if state is None or state.type not in (StateType.CRASHED, StateType.FAILED):
            break
        began = run.start_time or run.created or state.timestamp
        ended = run.end_time or state.timestamp
        if began is None or ended is None or (ended - began).total_seconds() > SHORT_RUN_S:
            break
        short += 1
    if short < 2 or not runs or runs[0].state is None:
        return 0.0, short
    wait = min(BACKOFF_FIRST_S * 2 ** (short - 2), BACKOFF_MAX_S)
    last_end = runs[0].end_time or runs[0].state.timestamp
    return max(0.0, wait - (now - last_end).total_seconds()), short


def plan_slot(state: SlotState, now: dt.datetime, stale_after_s: float) -> SlotPlan:
    """Crash the runs whose host is gone, keep one live run and cancel the waiting rest, or start one."""
    slot = state.slot
    plan = SlotPlan(SlotReport(slot=slot.name, deployment=slot.deployment))
    report = plan.report
    live: list[FlowRun] = []
    for run in state.alive:
        stale, age = stale_verdict(run, state.heartbeats.get(run.id), now, stale_after_s)
        if run.state and run.state.type == StateType.RUNNING:
            report.heartbeat_age_s = age
        if stale:
            assert age is not None
            report.detail = f"{run.name}: no heartbeat for {age:.0f} s, marked Crashed"
            plan.crash.append((run, age))
        else:
            live.append(run)

    running = [r for r in live if r.state and r.state.type != StateType.SCHEDULED]
    keep = running[0] if running else (live[0] if live else None)
    for extra in live:
        if extra is keep or (extra.state and extra.state.type != StateType.SCHEDULED):
            continue
        plan.cancel.append(extra)
        report.note(f"cancelled waiting duplicate {extra.name}")
    if len(running) > 1:
        report.note("several runs active: " + ", ".join(r.name for r in running))
    if keep is not None:
        report.run = keep.name
        report.state = keep.state.name if keep.state else ""
        return plan

    previous = state.history[0] if state.history else None
    wait, failures = backoff_s(state.history, now)
    if wait > 0:
        report.action = "backoff"
        report.run = previous.name if previous else ""
        report.state = previous.state.name if previous and previous.state else ""
        report.detail = f"{failures} runs in a row failed within {SHORT_RUN_S:.0f} s of starting; next try in {wait:.0f} s"
        return plan
    plan.start, plan.previous = True, previous
    report.action = "started"
    if previous is not None:
        report.note(f"replaces {previous.name} ({previous.state.name if previous.state else '?'})")
    return plan


# --- reading Prefect and doing it ------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


async def fleet_runs(client: PrefectClient) -> dict[str, list[FlowRun]]:
    """Alive runs tagged ``fleet``, by slot, oldest first."""
    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[FLEET_TAG]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ALIVE)),
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=200,
    )
    by_slot: dict[str, list[FlowRun]] = {}
    for run in runs:
        slot = slot_of(run.tags)
        if slot:
            by_slot.setdefault(slot, []).append(run)
    return by_slot


async def recent_runs(client: PrefectClient, slot: Slot, n: int = BACKOFF_LOOKBACK) -> list[FlowRun]:
    """The slot's newest runs in any state, newest first."""
    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[FLEET_TAG, slot.tag])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=n,
    )


async def last_heartbeat(client: PrefectClient, run_id: UUID, since: dt.datetime) -> dt.datetime | None:
    """When the run last sent a heartbeat event since ``since`` (None: none in that window)."""
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventOrder,
        EventResourceFilter,
    )

    page = await client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=since, until=_now() + dt.timedelta(minutes=1)),
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
            order=EventOrder.DESC,
        ),
        limit=1,
    )
    events = page.events if page else []
    return max((e.occurred for e in events), default=None)


async def crash_orphans(client: PrefectClient, parent: FlowRun) -> int:
    """Subflow runs (inference sessions) left Running or Pending by a run whose process died: Crashed too."""
    children = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])),
        ),
        limit=50,
    )
    for child in children:
        await client.set_flow_run_state(
            child.id, Crashed(message=f"fleet keeper: its parent run {parent.name} crashed"), force=True
        )
    return len(children)


class Keeper:
    """One pass of the keeper over a fleet, against the Prefect API (idempotent: two passes at once
    start at most one extra run, which waits in the slot's Prefect work queue and the next pass cancels)."""

    def __init__(self, client: PrefectClient, fleet: Fleet, *, dry_run: bool = False):
        self.client = client
        self.fleet = fleet
        self.dry_run = dry_run
        self._pools: dict[str, str] = {}  # deployment -> its work pool
        self._work_queues: set[tuple[str, str]] = set()  # (pool, Prefect work queue) known with concurrency 1

    async def run_pass(self) -> KeeperResult:
        result = KeeperResult()
        alive = await fleet_runs(self.client)
        for slot in self.fleet.slots:
            try:
                report = await self.keep(slot, alive.get(slot.name, []), result)
            except Exception as exc:  # noqa: BLE001 - one slot's trouble must not stop the others
                result.errors += 1
                report = SlotReport(slot=slot.name, deployment=slot.deployment, action="error",
                                    detail=f"{type(exc).__name__}: {exc}"[:300])
                log.warning("slot %s: %s", slot.name, report.detail)
            result.slots.append(report)
        return result

    async def keep(self, slot: Slot, alive: list[FlowRun], result: KeeperResult) -> SlotReport:
        """Read the slot's state, plan, carry the plan out; returns the slot's row."""
        pool = await self.pool_of(slot.deployment)
        if not self.dry_run:
            await self.ensure_work_queue(pool, slot.work_queue)
        now = _now()
        heartbeats = {}
        if self.fleet.stale_after_s > 0:
            for run in alive:
                if run.state and run.state.type == StateType.RUNNING:
                    heartbeats[run.id] = await last_heartbeat(self.client, run.id, now - HEARTBEAT_LOOKBACK)
        history = await recent_runs(self.client, slot)
        plan = plan_slot(SlotState(slot, alive, heartbeats, history), now, self.fleet.stale_after_s)
        await self.carry_out(slot, plan, result)
        return plan.report

    async def pool_of(self, deployment_name: str) -> str:
        if deployment_name not in self._pools:
            deployment = await self.client.read_deployment_by_name(deployment_name)
            if not deployment.work_pool_name:
                raise RuntimeError(f"deployment {deployment_name} has no work pool")
            self._pools[deployment_name] = deployment.work_pool_name
        return self._pools[deployment_name]

    async def ensure_work_queue(self, pool: str, queue: str) -> None:
        """The slot's Prefect work queue, concurrency 1, in the deployment's pool (created once, limit restored if changed)."""
        if (pool, queue) in self._work_queues:
            return
        try:
            existing = await self.client.read_work_queue_by_name(queue, work_pool_name=pool)
        except ObjectNotFound:
            try:
                await self.client.create_work_queue(
                    name=queue,
                    work_pool_name=pool,
                    concurrency_limit=1,
                    description="One fair-worker run at a time on this GPU slot (made by the fleet keeper).",
                )
            except ObjectAlreadyExists:
                pass
        else:
            if existing.concurrency_limit != 1:
                await self.client.update_work_queue(existing.id, concurrency_limit=1)
        self._work_queues.add((pool, queue))

    async def carry_out(self, slot: Slot, plan: SlotPlan, result: KeeperResult) -> None:
        report = plan.report
        for run, age in plan.crash:
            result.crashed += 1
            if not self.dry_run:
                await self.client.set_flow_run_state(
                    run.id, Crashed(message=f"fleet keeper: no heartbeat for {age:.0f} s (host or process lost)"),
                    force=True)
        for run in plan.cancel:
            result.cancelled += 1
            if not self.dry_run:
                await self.client.set_flow_run_state(run.id, Cancelled(message="fleet keeper: duplicate run of this slot"))
        if not plan.start:
            return
        result.started += 1
        if self.dry_run:
            report.state = "(dry run)"
            return
        previous = plan.previous
        if previous is not None and previous.state and previous.state.type == StateType.CRASHED:
            orphans = await crash_orphans(self.client, previous)
            if orphans:
                report.detail += f", {orphans} of its subflow runs marked Crashed"
        run = await run_deployment(
            slot.deployment,
            parameters=slot.parameters,
            flow_run_name=slot.name,
            tags=slot.tags,
            work_queue_name=slot.work_queue,
            timeout=0,
            as_subflow=False,
            client=self.client,
            # Two passes at once (the schedule and the trigger) that saw the same last run make one run.
            idempotency_key=f"fleet:{slot.name}:after:{previous.id if previous else 'none'}",
        )
        if run.state and run.state.is_final():  # the key matched a run that already ended: next pass
            report.action = "wait"
            result.started -= 1
        report.run = run.name
        report.state = run.state.name if run.state else "Scheduled"
        log.info("slot %s: started run %s (%s)", slot.name, run.name, run.id)


async def keep_fleet(client: PrefectClient, fleet: Fleet, *, dry_run: bool = False) -> KeeperResult:
    """One pass of the keeper over ``fleet``."""
    return await Keeper(client, fleet, dry_run=dry_run).run_pass()
