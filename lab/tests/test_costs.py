"""The stand-in charges what Antenna charges (a scenario's ``antenna`` section), over real HTTP and NATS.

Web workers: requests wait for a free one, in arrival order, and hold it for their endpoint's cost
(a ``/tasks`` fetch that finds fewer tasks than asked holds it through the 0.5 s wait too). Saves:
one FIFO queue across jobs on ``save_workers`` workers at ``save_s_per_result`` each, acked after
the save. Without a cost model nothing is charged. Timings have wide margins for a shared CPU, but
each bound is one the model without costs (or with the wrong order) would miss.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Iterator

import httpx
import pytest

from antenna_flows.antenna_client import AntennaClient
from antenna_lab.antenna.costs import AntennaCosts, Cpu
from antenna_lab.antenna.devstack import DevStack
from antenna_lab.antenna.streams import JobStreams
from antenna_lab.settings import ApiSettings, QueueSettings

from lab.tests.test_api_contract import PIPELINE, post_results, reserve, success

WORKER_HEADERS = {"User-Agent": "antenna-flows/test"}  # a worker's requests (the admin client's are free)


@pytest.fixture
def costly(nats_server, tmp_path_factory) -> Iterator[Callable[..., DevStack]]:
    """``costly(**antenna_section)``: a started DevStack whose requests and saves cost what it says."""
    stacks: list[DevStack] = []

    def make(**section: Any) -> DevStack:
        costs = AntennaCosts.model_validate(section) if section else None
        data = tmp_path_factory.mktemp("costly")
        stack = DevStack(QueueSettings(nats_task_ttr=10.0, nats_max_deliver=2), ApiSettings(api_port=0, data_dir=data),
                         nats_url=nats_server.url, costs=costs, housekeeping_interval_s=0.2)
        stacks.append(stack.start())
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def _worker_client(stack: DevStack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.api_url + "/", timeout=30,
                             headers={"Authorization": f"Token {stack.token}", **WORKER_HEADERS})


async def _timed(call) -> tuple[float, float]:
    start = time.monotonic()
    response = await call
    assert response.status_code == 200, response.text
    return start, time.monotonic()


async def test_requests_wait_for_a_free_web_worker_in_arrival_order(costly) -> None:
    stack = costly(web_workers=1, request_s={"jobs": 0.3})
    async with _worker_client(stack) as client:
        calls = []
        for _ in range(3):
            calls.append(asyncio.create_task(_timed(client.get("jobs/", params={"ids_only": 1}))))
            await asyncio.sleep(0.02)  # arrival order
        spans = await asyncio.gather(*calls)
    start = spans[0][0]
    ends = [end - start for _, end in spans]
    assert ends == sorted(ends)  # served first come, first served
    assert ends[0] >= 0.29 and ends[1] >= 0.59 and ends[2] >= 0.89  # one at a time, 0.3 s each
    web = stack.antenna.web.stats()
    assert web["jobs"]["requests"] == 3 and web["max_backlog"] >= 2 and web["jobs"]["max_wait_s"] >= 0.5
    # the bench's own admin requests take no web worker and cost nothing
    started = time.monotonic()
    stack.admin.jobs()
    assert time.monotonic() - started < 0.25


async def test_an_empty_fetch_holds_the_web_worker_through_its_wait(costly) -> None:
    """``/tasks`` on a job with nothing to hand out waits 0.5 s for the fetch, as Antenna's, on its web worker
    (nats-py's fetch returns at once with what there is: a queue holding fewer than asked costs no wait)."""
    stack = costly(web_workers=1, request_s={"jobs": 0.0, "tasks": 0.1})
    job = stack.create_job(PIPELINE, 1)
    async with _worker_client(stack) as client:
        start, end = await _timed(client.post(f"jobs/{job.id}/tasks/", json={"batch_size": 5}))
        assert 0.09 <= end - start < 0.45  # one task there: no wait
        short = asyncio.create_task(_timed(client.post(f"jobs/{job.id}/tasks/", json={"batch_size": 5})))
        await asyncio.sleep(0.05)
        behind = asyncio.create_task(_timed(client.get("jobs/", params={"ids_only": 1})))
        (s0, s1), (b0, b1) = await short, await behind
    assert s1 - s0 >= 0.58  # 0.1 s cost + 0.5 s fetch wait
    assert b1 - s0 >= 0.58  # the listing waited for the worker the fetch held
    assert stack.antenna.web.stats()["tasks"]["mean_held_s"] >= (0.1 + 0.6) / 2  # both calls held, on average


async def test_a_result_post_costs_per_request_and_per_result(costly) -> None:
    stack = costly(web_workers=2, request_s={"result": 0.1, "result_per_item": 0.05})
    job = stack.create_job(PIPELINE, 4)
    api = stack.admin.client
    tasks = reserve(api, job.id, 4)
    async with _worker_client(stack) as client:
        body = {"results": [{"reply_subject": t["reply_subject"], "result": success(t)} for t in tasks]}
        start, end = await _timed(client.post(f"jobs/{job.id}/result/", json=body))
    assert end - start >= 0.29  # 0.1 + 4 x 0.05
    assert stack.antenna.web.stats()["result"]["mean_held_s"] >= 0.29


async def test_saves_are_one_fifo_across_jobs_at_the_configured_rate_and_acked_after(costly, nats_queue: JobStreams) -> None:
    """A small job's results posted after a big job's wait behind all of them; each save takes its worker
    ``save_s_per_result``; a task is acked only once its result is saved."""
    stack = costly(save_workers=1, save_s_per_result=0.1)
    api = stack.admin.client
    big, small = stack.create_job(PIPELINE, 6), stack.create_job(PIPELINE, 2)
    big_tasks, small_tasks = reserve(api, big.id, 6), reserve(api, small.id, 2)
    posted = time.time()
    assert post_results(api, big.id, *[(t["reply_subject"], success(t)) for t in big_tasks]).status_code == 200
    assert post_results(api, small.id, *[(t["reply_subject"], success(t)) for t in small_tasks]).status_code == 200
    await asyncio.sleep(0.3)
    assert (await nats_queue.stats(small.id)).ack_pending == 2  # accepted, not saved, so not acked
    assert len(stack.store.results(big.id)) < 6 and stack.store.results(small.id) == []
    stack.wait_saved(timeout=10)
    saved = sorted([(r.first_at, big.id) for r in stack.store.results(big.id)]
                   + [(r.first_at, small.id) for r in stack.store.results(small.id)])
    assert [job for _, job in saved] == [big.id] * 6 + [small.id] * 2  # FIFO across jobs
    assert saved[-1][0] - posted >= 0.75  # 8 saves one at a time at 0.1 s
    delays = stack.antenna.plane.save_delays(small.id)
    assert len(delays) == 2 and min(delays) >= 0.6  # the small job waited behind the big one
    assert stack.antenna.plane.save_queue_peak >= 7


async def test_two_save_workers_save_twice_as_fast(costly) -> None:
    stack = costly(save_workers=2, save_s_per_result=0.2)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 6)
    tasks = reserve(api, job.id, 6)
    started = time.monotonic()
    assert post_results(api, job.id, *[(t["reply_subject"], success(t)) for t in tasks]).status_code == 200
    stack.wait_saved(timeout=10)
    took = time.monotonic() - started
    assert 0.55 <= took < 1.1  # 6 x 0.2 s on two workers: 0.6 s (one worker: 1.2 s)


async def test_without_a_cost_model_nothing_is_charged(costly) -> None:
    stack = costly()
    assert stack.antenna.web is None and stack.antenna.plane.save_s_per_result == 0.0
    job = stack.create_job(PIPELINE, 20)
    api = stack.admin.client
    tasks = reserve(api, job.id, 20)
    async with AntennaClient(stack.api_url, stack.token) as worker:
        started = time.monotonic()
        await asyncio.gather(*[worker.list_jobs([PIPELINE]) for _ in range(10)])
        listed = time.monotonic() - started
    started = time.monotonic()
    assert post_results(api, job.id, *[(t["reply_subject"], success(t)) for t in tasks]).status_code == 200
    stack.wait_saved(timeout=10)
    assert listed < 1.0 and time.monotonic() - started < 1.0  # with the costs above: 3 s and 4 s at least


def test_costs_load_from_a_scenario_or_a_section(tmp_path) -> None:
    section = {"web_workers": 3, "request_s": {"jobs": 0.1, "tasks": 0.2, "result": 0.3, "result_per_item": 0.01},
               "save_workers": 2, "save_s_per_result": 0.25}
    (tmp_path / "s.json").write_text(__import__("json").dumps({"name": "x", "antenna": section}))
    (tmp_path / "a.json").write_text(__import__("json").dumps(section))
    assert AntennaCosts.load(tmp_path / "s.json") == AntennaCosts.load(tmp_path / "a.json")
    costs = AntennaCosts.load(tmp_path / "a.json")
    assert [costs.request_cost_s(c) for c in ("jobs", "tasks", "result", "other")] == [0.1, 0.2, 0.3, 0.1]
    with pytest.raises(ValueError):
        AntennaCosts.model_validate({**section, "web_worker": 1})  # a typo is an error, not a free Antenna


# --- CPU shared by web and save workers (cpu_cores) ------------------------------------------------------------


async def _finish_times(cpu: Cpu, plan: list[tuple[float, float]]) -> list[float]:
    """Run pieces of (start offset, CPU seconds) on ``cpu``; when each ended, from the first start."""
    start = time.monotonic()

    async def piece(at: float, seconds: float) -> float:
        await asyncio.sleep(at)
        await cpu.run(seconds)
        return time.monotonic() - start

    return list(await asyncio.gather(*[piece(at, s) for at, s in plan]))


async def test_cpu_shares_its_cores_among_the_work_under_way() -> None:
    one = await _finish_times(Cpu(1), [(0.0, 0.2), (0.0, 0.2)])
    assert all(0.38 <= t < 0.55 for t in one)  # one core: both at half speed
    two = await _finish_times(Cpu(2), [(0.0, 0.2), (0.0, 0.2)])
    assert all(0.18 <= t < 0.33 for t in two)  # a core each
    three = await _finish_times(Cpu(2), [(0.0, 0.3)] * 3)
    assert all(0.43 <= t < 0.6 for t in three)  # 0.9 CPU s on 2 cores
    # staggered on one core: A alone for 0.1 s, then both at half speed until B's 0.1 s is done (at 0.3),
    # then A alone again with 0.2 s left
    a, b = await _finish_times(Cpu(1), [(0.0, 0.4), (0.1, 0.1)])
    assert 0.28 <= b < 0.4 and 0.48 <= a < 0.65
    free = await _finish_times(Cpu(None), [(0.0, 0.2)] * 4)
    assert all(0.18 <= t < 0.33 for t in free)  # no model: fixed delays


async def test_cancelled_work_stops_taking_cpu() -> None:
    cpu = Cpu(1)
    hog = asyncio.create_task(cpu.run(10.0))
    await asyncio.sleep(0.05)
    hog.cancel()
    [t] = await _finish_times(cpu, [(0.0, 0.2)])
    assert t < 0.33 and not cpu._work  # noqa: SLF001 - the one piece of state this test is about


async def test_requests_slow_the_saves_when_they_share_the_cpu(costly) -> None:
    """``cpu_cores``: the web workers and save workers share the cores, as gunicorn and Celery do on Antenna's
    host: with one core, saves running while requests are served take longer than ``save_s_per_result``."""
    stack = costly(web_workers=2, request_s={"jobs": 0.2}, save_workers=1, save_s_per_result=0.1, cpu_cores=1)
    api = stack.admin.client
    job = stack.create_job(PIPELINE, 4)
    tasks = reserve(api, job.id, 4)
    started = time.monotonic()
    assert post_results(api, job.id, *[(t["reply_subject"], success(t)) for t in tasks]).status_code == 200
    async with _worker_client(stack) as client:
        await asyncio.gather(*[client.get("jobs/", params={"ids_only": 1}) for _ in range(4)])
    stack.wait_saved(timeout=10)
    took = time.monotonic() - started
    # alone the 4 saves take 0.4 s; with 0.8 CPU s of requests on the one core, both finish after ~1.2 s
    assert took >= 0.9
    assert stack.antenna.web.cpu.busy_s >= 1.1
