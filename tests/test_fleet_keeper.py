"""The fleet keeper (antenna_flows/fleet/keeper.py): what it decides for a slot, then one pass for real.

The decisions are pure (:func:`plan_slot`, :func:`stale_verdict`, :func:`backoff_s`): runs and times
are given, nothing is read. The pass runs against Prefect's test server: it starts missing slots on
their queues, cancels a stray duplicate, crashes a Running run whose heartbeats stopped and leaves
one that never sent any.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from uuid import uuid4

import pytest

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect.client.schemas.objects import FlowRun, State, StateType

from antenna_flows.fleet.keeper import SlotState, backoff_s, keep_fleet, last_heartbeat, plan_slot, stale_verdict
from antenna_flows.fleet.spec import parse_fleet, slot_of

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
CRASHED, FAILED, RUNNING, SCHEDULED = StateType.CRASHED, StateType.FAILED, StateType.RUNNING, StateType.SCHEDULED
SLOT = parse_fleet({"hosts": [{"name": "kt", "gpus": 1}]}).slots[0]


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def run(kind: StateType, name: str = "kt-gpu0", since: float = 3600, ended_ago: float | None = None,
        lasted: float | None = None) -> FlowRun:
    """A flow run in state ``kind`` entered ``since`` seconds ago (or ended ``ended_ago`` after ``lasted``)."""
    if ended_ago is not None:
        end = ago(ended_ago)
        return FlowRun(flow_id=uuid4(), name=name, state=State(type=kind, timestamp=end),
                       start_time=end - dt.timedelta(seconds=lasted or 0), end_time=end)
    return FlowRun(flow_id=uuid4(), name=name, state=State(type=kind, timestamp=ago(since)), start_time=ago(since))


def test_backoff_after_runs_that_fail_at_start():
    def failed(kind: StateType, ended_ago: float, lasted: float) -> FlowRun:
        return run(kind, ended_ago=ended_ago, lasted=lasted)

    assert backoff_s([], NOW) == (0.0, 0)
    assert backoff_s([failed(CRASHED, 5, 3)], NOW) == (0.0, 1)  # one failed start: retry at once
    wait, n = backoff_s([failed(CRASHED, 5, 3), failed(CRASHED, 40, 3)], NOW)
    assert n == 2 and wait == pytest.approx(25, abs=1)  # 30 s after the last one
    wait, n = backoff_s([failed(FAILED, 5, 3)] + [failed(CRASHED, 40 * i, 3) for i in range(1, 6)], NOW)
    assert n == 6 and wait == pytest.approx(480 - 5, abs=1)  # 30 * 2**4
    assert backoff_s([failed(CRASHED, 5, 3)] * 20, NOW)[0] == pytest.approx(600 - 5, abs=1)  # capped
    # A run that served a while before it crashed (a killed process) is replaced at once.
    assert backoff_s([failed(CRASHED, 5, 3600), failed(CRASHED, 40, 3)], NOW) == (0.0, 0)
    assert backoff_s([failed(StateType.COMPLETED, 5, 3), failed(CRASHED, 40, 3)], NOW) == (0.0, 0)


def test_a_run_is_stale_only_after_heartbeats_stopped():
    running = run(RUNNING, since=3600)
    assert stale_verdict(running, ago(30), NOW, 600) == (False, 30.0)  # beating
    assert stale_verdict(running, ago(900), NOW, 600) == (True, 900.0)  # beat, then silence: host gone
    assert stale_verdict(running, None, NOW, 600) == (False, None)  # never beat (heartbeats off): never stale
    assert stale_verdict(run(RUNNING, since=100), ago(900), NOW, 600) == (False, None)  # Running again only lately
    assert stale_verdict(running, ago(900), NOW, 0) == (False, None)  # stale_after_s 0: never
    assert stale_verdict(run(SCHEDULED), None, NOW, 600) == (False, None)


def test_plan_keeps_one_live_run_and_cancels_the_waiting_duplicates():
    live, waiting = run(RUNNING, "kt-gpu0"), run(SCHEDULED, "kt-gpu0-dup")
    plan = plan_slot(SlotState(SLOT, [waiting, live], {live.id: ago(10)}, [live]), NOW, 600)
    assert (plan.start, plan.crash, plan.cancel) == (False, [], [waiting])
    assert (plan.report.run, plan.report.state, plan.report.action, plan.report.heartbeat_age_s) == (
        "kt-gpu0", "Running", "ok", 10.0)
    assert plan.report.detail == "cancelled waiting duplicate kt-gpu0-dup"
    # Only Scheduled runs: the oldest is kept, the others cancelled.
    first, second = run(SCHEDULED, "a"), run(SCHEDULED, "b")
    plan = plan_slot(SlotState(SLOT, [first, second], {}, [second, first]), NOW, 600)
    assert plan.report.run == "a" and plan.cancel == [second] and not plan.start


def test_plan_crashes_a_silent_run_and_starts_its_replacement():
    silent = run(RUNNING, "kt-gpu0", since=3600)
    plan = plan_slot(SlotState(SLOT, [silent], {silent.id: ago(700)}, [silent]), NOW, 600)
    assert plan.crash == [(silent, 700.0)] and plan.start and plan.previous is silent
    assert plan.report.action == "started"
    assert plan.report.detail == "kt-gpu0: no heartbeat for 700 s, marked Crashed; replaces kt-gpu0 (Running)"


def test_plan_backs_off_a_slot_whose_runs_fail_at_start():
    history = [run(CRASHED, "kt-gpu0", ended_ago=5, lasted=3), run(CRASHED, "kt-gpu0", ended_ago=40, lasted=3)]
    plan = plan_slot(SlotState(SLOT, [], {}, history), NOW, 600)
    assert not plan.start and plan.report.action == "backoff" and plan.report.state == "Crashed"
    assert plan.report.detail == "2 runs in a row failed within 60 s of starting; next try in 25 s"
    plan = plan_slot(SlotState(SLOT, [], {}, history[:1]), NOW, 600)  # one failed start: try again at once
    assert plan.start and plan.previous is history[0]
    plan = plan_slot(SlotState(SLOT, [], {}, []), NOW, 600)  # a new slot
    assert plan.start and plan.previous is None and plan.report.detail == ""


@pytest.mark.prefect
async def test_keeper_pass_starts_missing_slots_cancels_duplicates_and_crashes_silent_runs(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.events import emit_event
    from prefect.states import Running

    from antenna_flows.flows.worker import fair_worker

    spec = {
        "deployment": "fair-worker/keeper-test",
        "stale_after_s": 60,
        "hosts": [{"name": "kt", "gpus": 2, "parameters": {"model_kind": "sim"}}],
    }
    fleet = parse_fleet(spec)
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name="keeper-test-pool", type="process"), overwrite=True)
        await (await fair_worker.ato_deployment(name="keeper-test", work_pool_name="keeper-test-pool")).apply()

        first = await keep_fleet(client, fleet)
        assert (first.started, first.errors) == (2, 0), [s.row() for s in first.slots]
        runs = {slot_of(r.tags): r for r in await client.read_flow_runs() if "fleet" in r.tags}
        assert set(runs) == {"kt-gpu0", "kt-gpu1"}
        gpu1 = runs["kt-gpu1"]
        assert gpu1.work_queue_name == "kt-gpu1" and gpu1.parameters["device"] == "cuda:1"
        assert gpu1.parameters["worker_name"] == "kt-gpu1" and gpu1.parameters["model_kind"] == "sim"
        queue = await client.read_work_queue_by_name("kt-gpu1", work_pool_name="keeper-test-pool")
        assert queue.concurrency_limit == 1

        again = await keep_fleet(client, fleet)  # idempotent: Scheduled runs are alive
        assert (again.started, again.cancelled, again.crashed) == (0, 0, 0)

        # gpu0's run starts; a stray second run of the slot waits behind it: the keeper cancels the stray.
        gpu0 = runs["kt-gpu0"]
        await client.set_flow_run_state(gpu0.id, Running(), force=True)
        stray = await client.create_flow_run_from_deployment(
            gpu0.deployment_id, parameters=gpu0.parameters, tags=["fleet", "fleet-slot:kt-gpu0"], work_queue_name="kt-gpu0")
        third = await keep_fleet(client, fleet)
        assert (third.started, third.cancelled) == (0, 1)
        assert (await client.read_flow_run(stray.id)).state.is_cancelled()

        # gpu1's run is Running and sent a heartbeat once, none for longer than stale_after_s since: its
        # host is gone. (The server stamps states itself, so the test waits out a 2 s stale_after_s.)
        await client.set_flow_run_state(gpu1.id, Running(), force=True)
        emit_event(
            "prefect.flow-run.heartbeat",
            resource={"prefect.resource.id": f"prefect.flow-run.{gpu1.id}"},
            occurred=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=10),
        )
        # gpu0 is Running without any heartbeat ever (heartbeats off): never called stale.
        await client.set_flow_run_state(gpu0.id, Running(), force=True)

        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        deadline = time.monotonic() + 30
        while await last_heartbeat(client, gpu1.id, since) is None:
            assert time.monotonic() < deadline, "the heartbeat event never reached the events API"
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.5)
        fleet = parse_fleet({**spec, "stale_after_s": 2})
        fourth = await keep_fleet(client, fleet)
        assert (fourth.crashed, fourth.started) == (1, 1), [s.row() for s in fourth.slots]
        assert (await client.read_flow_run(gpu1.id)).state.is_crashed()
        assert (await client.read_flow_run(gpu0.id)).state.is_running()
        row = {s.slot: s for s in fourth.slots}["kt-gpu1"]
        assert row.action == "started" and "no heartbeat" in row.detail and "replaces" in row.detail
