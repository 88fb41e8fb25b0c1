"""The worker's HTTP client for Antenna (antenna_flows/antenna_client.py), over real HTTP.

Against the local Antenna: the job list (ids only, and the full list), /tasks and /result,
projects, and the errors it answers with. Against tiny local servers that answer exactly as
scripted: every way a request can fail sorted into the one taxonomy (401/403 AuthError,
other 4xx Rejected, 5xx, timeouts and refused connections Unavailable), real Antenna's
full-list rows read into total and saved counts, and project paging by offset.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from antenna_flows import __version__
from antenna_flows.antenna_client import AntennaClient, AntennaError, AuthError, Rejected, Unavailable
from antenna_flows.schemas import PipelineResultsError, TaskResult
from tests.helpers import PIPELINE, REAL_ANTENNA_JOB_ROW, serve_http

OTHER = "sim-moth_binary"

# --- a scripted server -------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class Scripted:
    """A local HTTP server whose answer to each request is ``answer(seen) -> (status, body, delay_s)``."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    answer: Callable[[Seen], tuple[int, Any, float]] = lambda seen: (200, {}, 0.0)


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[Scripted]:
    """One server for the module (stopping one takes ~0.5 s); each test scripts it afresh (``scripted``)."""
    script = Scripted()

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            parts = urlsplit(self.path)
            seen = Seen(self.command, parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()},
                        {k.lower(): v for k, v in self.headers.items()})
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            script.seen.append(seen)
            status, body, delay = script.answer(seen)
            time.sleep(delay)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                pass

        do_GET = do_POST = _any  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = serve_http(Handler)
    script.url = next(server) + "/api/v2"
    yield script
    server.close()


@pytest.fixture
def scripted(scripted_server: Scripted) -> Scripted:
    scripted_server.seen.clear()
    scripted_server.answer = Scripted.answer
    return scripted_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the local Antenna -------------------------------------------------------------------------------


async def test_list_jobs_ids_only_incomplete_async_jobs_of_the_pipelines_asked(stack):
    a = stack.create_job(PIPELINE, 2, priority=3)
    b = stack.create_job(PIPELINE, 2)
    c = stack.create_job(OTHER, 2)
    stack.create_job(PIPELINE, 2, dispatch_mode="sync_api")  # not a worker's
    async with AntennaClient(stack.api_url, stack.token) as client:
        mine = await client.list_jobs([PIPELINE])
        assert sorted((j.id, j.pipeline_slug, j.priority) for j in mine) == [(a.id, PIPELINE, 3), (b.id, PIPELINE, 0)]
        both = await client.list_jobs([PIPELINE, OTHER])
        assert sorted(j.id for j in both) == sorted([a.id, b.id, c.id])
        assert all(j.total is None and j.saved is None for j in both)  # ids only: no progress
        assert len(await client.list_jobs([PIPELINE, OTHER], limit=None)) == 1  # Antenna's default: one random job
        full = await client.list_jobs([PIPELINE], progress=True)
        assert sorted((j.id, j.pipeline_slug) for j in full) == [(a.id, PIPELINE), (b.id, PIPELINE)]
    assert stack.request_counts()["jobs"] == 4


async def test_reserve_and_post_round_trip(stack):
    job = stack.create_job(PIPELINE, 2)
    async with AntennaClient(stack.api_url, stack.token, worker_name="w-1") as client:
        reserved = await client.reserve_tasks(job.id, 5)
        assert len(reserved) == 2 and len({t.image_id for t in reserved}) == 2
        assert all(t.reply_subject for t in reserved)
        answer = await client.post_results(job.id, [
            TaskResult(reply_subject=t.reply_subject or "", result=PipelineResultsError(error="x", image_id=t.image_id))
            for t in reserved])
    assert (answer.status, answer.job_id, answer.results_queued) == ("accepted", job.id, 2)
    assert sorted(t.reply_subject for t in answer.tasks) == sorted(t.reply_subject or "" for t in reserved)
    stack.wait_saved()
    assert stack.admin.job(job.id).errors == 2


async def test_the_local_antennas_refusals_are_sorted(stack):
    job = stack.create_job(PIPELINE, 1)
    async with AntennaClient(stack.api_url, "wrong-token") as wrong:
        with pytest.raises(AuthError) as denied:
            await wrong.reserve_tasks(job.id, 1)
        assert denied.value.status == 401 and stack.api_url in str(denied.value)  # names where, for the log
        with pytest.raises(AuthError):
            await wrong.list_jobs([PIPELINE])  # a wrong token is refused even where anonymous reads are allowed
    async with AntennaClient(stack.api_url, stack.token) as client:
        with pytest.raises(Rejected) as missing:
            await client.reserve_tasks(987_654, 1)
        assert missing.value.status == 404 and "Not found" in missing.value.body
        with pytest.raises(Rejected) as bad:
            await client.reserve_tasks(job.id, 0)
        assert bad.value.status == 400 and "batch_size" in bad.value.body


async def test_projects_are_every_page_of_the_local_antennas(stack):
    stack.create_job(PIPELINE, 1, project_id=7)
    stack.create_job(PIPELINE, 1, project_id=3)
    async with AntennaClient(stack.api_url, stack.token) as client:
        assert [p["id"] for p in await client.list_projects(page_size=1)] == [1, 3, 7]
        assert [p["id"] for p in await client.list_projects()] == [1, 3, 7]


# --- the error taxonomy, status by status ---------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [
    (401, AuthError), (403, AuthError),
    (400, Rejected), (404, Rejected), (409, Rejected), (413, Rejected),
    (500, Unavailable), (502, Unavailable), (503, Unavailable), (504, Unavailable),
])
async def test_each_status_is_one_kind_of_error(scripted, status, kind):
    scripted.answer = lambda seen: (status, {"detail": f"because {status}"}, 0.0)
    async with AntennaClient(scripted.url, "t") as client:
        for call in (client.list_jobs(["x"]), client.reserve_tasks(1, 1), client.post_results(1, []),
                     client.list_projects()):
            with pytest.raises(kind) as caught:
                await call
            assert type(caught.value) is kind and isinstance(caught.value, AntennaError)
            assert caught.value.status == status and f"because {status}" in caught.value.body


async def test_a_timeout_is_unavailable(scripted):
    scripted.answer = lambda seen: (200, {"count": 0, "results": []}, 1.0)
    async with AntennaClient(scripted.url, "t", timeout_s=0.2) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await client.list_jobs(["x"])
    assert time.monotonic() - started < 0.9 and caught.value.status is None and "Timeout" in str(caught.value)


async def test_a_refused_connection_is_unavailable():
    url = f"http://127.0.0.1:{free_port()}/api/v2"
    async with AntennaClient(url, "t", timeout_s=2.0) as client:
        for call in (client.list_jobs(), client.reserve_tasks(1, 1), client.list_projects()):
            with pytest.raises(Unavailable) as caught:
                await call
            assert caught.value.status is None and "ConnectError" in str(caught.value)


@pytest.mark.parametrize("body", [b"<html>proxy error</html>", {"unexpected": True}, {"results": [{"no": "id"}]}])
async def test_an_unreadable_answer_is_unavailable(scripted, body):
    scripted.answer = lambda seen: (200, body, 0.0)
    async with AntennaClient(scripted.url, "t") as client:
        for call in (client.list_jobs(["x"]), client.list_jobs(["x"], progress=True), client.reserve_tasks(1, 1),
                     client.post_results(1, [])):
            with pytest.raises(Unavailable, match="unreadable answer"):
                await call


# --- the job list's two shapes ----------------------------------------------------------------------------


async def test_the_poll_asks_what_antenna_expects_and_says_who_asks(scripted):
    scripted.answer = lambda seen: (200, {"count": 1, "next": None, "previous": None,
                                          "results": [{"id": 4, "pipeline_slug": "sim-a"}]}, 0.0)
    async with AntennaClient(scripted.url, "secret") as client:
        [item] = await client.list_jobs(["sim-b", "sim-a"])
        await client.list_jobs(None, limit=None)
    assert (item.id, item.pipeline_slug, item.priority, item.total) == (4, "sim-a", 0, None)
    first, second = scripted.seen
    assert (first.method, first.path) == ("GET", "/api/v2/jobs/")
    assert first.query == {"incomplete_only": "1", "dispatch_mode": "async_api", "ids_only": "1",
                           "pipeline__slug__in": "sim-b,sim-a", "limit": "1000"}
    assert second.query == {"incomplete_only": "1", "dispatch_mode": "async_api", "ids_only": "1"}
    assert first.headers["authorization"] == "Token secret"
    assert first.headers["user-agent"] == f"antenna-flows/{__version__}"


async def test_the_full_list_reads_real_antennas_rows_into_total_and_saved(scripted):
    other = {**REAL_ANTENNA_JOB_ROW, "id": 21, "progress": {"stages": []}}
    scripted.answer = lambda seen: (200, {"count": 2, "next": None, "previous": None,
                                          "results": [REAL_ANTENNA_JOB_ROW, other]}, 0.0)
    async with AntennaClient(scripted.url, "t") as client:
        first, second = await client.list_jobs(["sim-quebec_vermont_moths_2023"], progress=True)
    assert (first.id, first.pipeline_slug, first.total, first.saved) == (20, "sim-quebec_vermont_moths_2023", 10, 10)
    assert (second.id, second.total, second.saved) == (21, None, None)
    [seen] = scripted.seen
    assert "ids_only" not in seen.query  # the full list: Antenna does not count it as liveness
    assert seen.query["incomplete_only"] == "1" and seen.query["dispatch_mode"] == "async_api"


# --- projects, page by page ---------------------------------------------------------------------------------


def projects_answer(existing: int, count: int | None = None, next_url: str | None = "http://antenna-internal:8000/x"):
    def answer(seen: Seen) -> tuple[int, Any, float]:
        limit, offset = int(seen.query["limit"]), int(seen.query["offset"])
        rows = [{"id": i, "name": f"p{i}"} for i in range(1 + offset, 1 + min(existing, offset + limit))]
        return 200, {"count": existing if count is None else count, "next": next_url, "previous": None,
                     "results": rows}, 0.0

    return answer


async def test_projects_are_walked_by_offset_until_the_count(scripted):
    scripted.answer = projects_answer(250)
    async with AntennaClient(scripted.url, "t") as client:
        projects = await client.list_projects(page_size=100)
    assert [p["id"] for p in projects] == list(range(1, 251))
    assert [(s.query["limit"], s.query["offset"]) for s in scripted.seen] == [("100", "0"), ("100", "100"),
                                                                              ("100", "200")]
    assert all(s.path == "/api/v2/projects/" for s in scripted.seen)  # never the `next` host


async def test_projects_stop_at_an_empty_page_whatever_the_count_says(scripted):
    scripted.answer = projects_answer(150, count=10_000)
    async with AntennaClient(scripted.url, "t") as client:
        projects = await client.list_projects(page_size=100)
    assert len(projects) == 150 and [s.query["offset"] for s in scripted.seen] == ["0", "100", "150"]


async def test_projects_as_a_plain_list_are_one_page(scripted):
    scripted.answer = lambda seen: (200, [{"id": 1}, {"id": 2}, "not a project"], 0.0)
    async with AntennaClient(scripted.url, "t") as client:
        assert await client.list_projects() == [{"id": 1}, {"id": 2}]
    assert len(scripted.seen) == 1
