"""Which failures are retried, and the one retry loop, against real Prefect failed states and task runs.

5xx (``Unavailable``), timeouts and connection errors are retried; a 4xx
(``AuthError``, ``Rejected``), any other exception, or a failed state holding
no exception never are (the rule used to fail open on the last two). One loop
(``antenna_flows.orchestration.retry.retry``) serves plain runs and the units
inside a ``serve-window`` task run alike.
"""

from __future__ import annotations

import asyncio

import pytest

import antenna_flows.prefect_env  # noqa: F401 - before prefect
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.states import Failed, exception_to_failed_state

from antenna_flows.antenna_client import AuthError, Rejected, Unavailable
from antenna_flows.orchestration import PlainOrchestrator, is_retryable, retry, retryable
from antenna_flows.orchestration.windows import Unit

OUTAGES = [
    Unavailable("HTTP 503 from http://antenna/api/v2/jobs/1/result/"),
    asyncio.TimeoutError(),
    TimeoutError("read timed out"),
    ConnectionError("connection reset"),
    ConnectionRefusedError(111, "refused"),
    OSError(113, "no route to host"),
]
REFUSALS = [
    AuthError("HTTP 401 from http://antenna/api/v2/jobs/"),
    Rejected(400, "bad result", "http://antenna/api/v2/jobs/1/result/"),
    Rejected(404, "no such job", "http://antenna/api/v2/jobs/1/result/"),
]
BUGS = [ValueError("bad value"), KeyError("job"), RuntimeError("boom"), AssertionError("invariant")]


def ids(excs: list[BaseException]) -> list[str]:
    return [f"{type(e).__name__}" for e in excs]


@pytest.mark.parametrize("exc", OUTAGES, ids=ids(OUTAGES))
def test_outages_are_retried(exc):
    assert is_retryable(exc)
    assert retryable(None, None, Failed(data=exc))


@pytest.mark.parametrize("exc", REFUSALS + BUGS, ids=ids(REFUSALS + BUGS))
def test_refusals_and_bugs_are_not(exc):
    assert not is_retryable(exc)
    assert not retryable(None, None, Failed(data=exc))


@pytest.mark.parametrize("data", [None, "a message", 42, {"x": 1}])
def test_a_failed_state_without_an_exception_is_not_retried(data):
    assert not retryable(None, None, Failed(data=data))
    assert not retryable(None, None, Failed(message="failed", data=data))


@pytest.mark.parametrize("exc,expected", [(e, True) for e in OUTAGES] + [(e, False) for e in REFUSALS + BUGS],
                         ids=ids(OUTAGES + REFUSALS + BUGS))
async def test_states_made_by_prefect_from_exceptions(exc, expected, tmp_path):
    """``exception_to_failed_state`` as the task engine calls it: the exception inside a result record."""
    plain = await exception_to_failed_state(exc)
    assert retryable(None, None, plain) is expected
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))  # no server asked for its default
    recorded = await exception_to_failed_state(exc, result_store=store, write_result=False)
    assert retryable(None, None, recorded) is expected


@pytest.mark.prefect
@pytest.mark.parametrize("exc,attempts", [(Unavailable("HTTP 502"), 4), (asyncio.TimeoutError(), 4),
                                          (ConnectionResetError("reset"), 4), (OSError("unreachable"), 4),
                                          (AuthError("HTTP 403"), 1), (Rejected(400, "no", "u"), 1),
                                          (ValueError("bug"), 1)],
                         ids=["Unavailable", "TimeoutError", "ConnectionResetError", "OSError", "AuthError",
                              "Rejected", "ValueError"])
async def test_a_real_task_retries_outages_only(prefect_server, exc, attempts):
    calls = []

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retryable, cache_policy=NO_CACHE, persist_result=False)
    async def flaky() -> None:
        calls.append(1)
        raise exc

    @flow(persist_result=False)
    async def runner() -> None:
        await flaky()

    state = await runner(return_state=True)
    assert state.is_failed()
    assert len(calls) == attempts


@pytest.mark.parametrize("exc,attempts", [(Unavailable("HTTP 503"), 3), (OSError("down"), 3),
                                          (Rejected(400, "no", "u"), 1), (AuthError("401"), 1), (ValueError("bug"), 1)],
                         ids=["Unavailable", "OSError", "Rejected", "AuthError", "ValueError"])
async def test_units_in_a_window_and_plain_runs_retry_the_same(exc, attempts):
    """The retries inside a serve-window task run, and plain orchestration's, follow the same rule."""
    calls = []

    async def fail() -> None:
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)) as raised:
        await Unit("post", fail, [0.0, 0.0], "post job 1 x1", {1: 1}).run()
    assert len(calls) == attempts
    assert raised.value.retries_taken == attempts - 1  # what the window's tally counts
    calls.clear()
    plain = PlainOrchestrator(post_retries=2, post_retry_delay_s=0.001)
    with pytest.raises(type(exc)):
        await plain.post(fail, "post job 1 x1")
    assert len(calls) == attempts


async def test_the_retry_loop_returns_the_retries_it_took():
    calls = []

    async def twice_down() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise Unavailable("HTTP 503")
        return "posted"

    assert await retry(twice_down, [0.0, 0.0, 0.0], "post job 1 x1") == ("posted", 2)
    calls.clear()
    with pytest.raises(Unavailable) as raised:  # more outages than delays: the last one is raised
        await retry(twice_down, [0.0], "post job 1 x1")
    assert len(calls) == 2 and raised.value.retries_taken == 1
