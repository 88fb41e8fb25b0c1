"""The one HTTP client family for Antenna's API, and its one error taxonomy.

:class:`AntennaClient` (async, one pooled httpx client per worker) does what a
worker needs: list incomplete jobs, reserve tasks through the REST endpoint
(the drain baseline and the REST transport), post results, list projects and
register pipelines. The local API's admin clients (``lab/antenna/admin.py``) build on
the same request checking (:func:`check_response`) and errors.

Errors are sorted into what a caller can act on, all :class:`AntennaError`
(``status``: the HTTP status or None, ``body``: the answer's JSON or text):
:class:`AuthError` (401/403, wrong token: stop), :class:`Rejected` (other
4xx: retrying will not help), :class:`Unavailable` (5xx, timeouts,
connection errors: retry later).
"""

from __future__ import annotations

import logging
import platform
import socket
from typing import Any

import httpx
from pydantic import ValidationError

from antenna_flows import __version__, results_codec
from antenna_flows.schemas import (
    JobListItem,
    PipelineConfigResponse,
    PipelineRegistrationRequest,
    JobListResponse,
    PipelineProcessingTask,
    ResultsRequest,
    ResultsResponse,
    TaskResult,
    TasksResponse,
)

log = logging.getLogger(__name__)

JOBS_PAGE_LIMIT = 1000
PROJECTS_PAGE_LIMIT = 100
PROJECTS_MAX = 10_000  # a bound on the walk, far above any Antenna's project count


USER_AGENT = f"antenna-flows/{__version__}"


class AntennaError(Exception):
    """Antenna answered with an error, or could not be reached. ``status`` is the HTTP
    status (None without an answer); ``body`` the answer's text ("" without one)."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body


class AuthError(AntennaError):
    """401/403: the token is wrong or lacks permission. Retrying will not help."""


class Rejected(AntennaError):
    """A 4xx other than auth: the request itself is wrong (or the job is gone: 404)."""

    def __init__(self, status: int, body: str, url: str):
        super().__init__(f"HTTP {status} from {url}: {body[:500]}", status, body)


class Unavailable(AntennaError):
    """5xx, timeout or connection failure: Antenna may answer later."""


def check_response(response: httpx.Response, method: str, where: str) -> httpx.Response:
    """The response if it is a success, else the error it is (shared by every client of the family)."""
    status = response.status_code
    if status < 400:
        return response
    body = response.text
    if status in (401, 403):
        raise AuthError(f"{method} {where}: HTTP {status} {response.text[:200]}", status, body)
    if status >= 500:
        raise Unavailable(f"{method} {where}: HTTP {status} {response.text[:200]}", status, body)
    raise Rejected(status, body, f"{method} {where}")


def transport_error(exc: httpx.HTTPError, method: str, where: str) -> Unavailable:
    return Unavailable(f"{method} {where}: {type(exc).__name__}: {exc}")


def auth_headers(token: str, user_agent: str = USER_AGENT) -> dict[str, str]:
    return {"Authorization": f"Token {token}", "User-Agent": user_agent}


def client_info(worker_name: str) -> dict[str, Any]:
    return {
        "worker": worker_name,
        "hostname": socket.gethostname(),
        "software": "antenna-flows",
        "version": __version__,
        "platform": platform.platform(),
    }


class AntennaClient:
    """Async client for Antenna's API (``base_url`` ends in ``/api/v2``)."""

    user_agent = USER_AGENT

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 30.0, worker_name: str = "antenna-flows"):
        self.base_url = base_url.rstrip("/")
        self.worker_name = worker_name
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=auth_headers(token, self.user_agent),
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AntennaClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(exc, method, f"{self.base_url}{path}") from exc
        return check_response(response, method, f"{self.base_url}{path}" if response.status_code in (401, 403) else path)

    async def register_pipelines(
        self, project_id: int, service_name: str, pipelines: list[PipelineConfigResponse]
    ) -> dict[str, Any]:
        """``POST /projects/{id}/pipelines/``: Antenna's answer (``pipelines_created``, ``algorithms_created``, ...)."""
        body = PipelineRegistrationRequest(processing_service_name=service_name, pipelines=pipelines)
        response = await self._request(
            "POST",
            f"/projects/{project_id}/pipelines/",
            content=body.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )
        try:
            answer = response.json()
        except ValueError as exc:
            raise Unavailable(f"POST /projects/{project_id}/pipelines/: unreadable answer: {exc}") from exc
        return answer if isinstance(answer, dict) else {"answer": answer}

    async def list_projects(self, page_size: int = PROJECTS_PAGE_LIMIT) -> list[dict[str, Any]]:
        """``GET /projects/``, every page: the projects this token can see (``id``, ``name``, ...).

        What upstream's ``ami worker register`` reads to register everywhere (Antenna's
        ProjectViewSet: active projects visible to the user, public ones included, 40 a page by
        default); pages are walked by offset, not by ``next`` (its host may be Antenna's
        internal name behind a proxy)."""
        projects: list[dict[str, Any]] = []
        offset = 0
        while True:
            response = await self._request("GET", "/projects/", params={"limit": page_size, "offset": offset})
            try:
                page = response.json()
                rows = page["results"] if isinstance(page, dict) else page
                count = page.get("count") if isinstance(page, dict) else len(rows)
            except (ValueError, KeyError, TypeError) as exc:
                raise Unavailable(f"GET /projects/: unreadable answer: {exc}") from exc
            projects.extend(row for row in rows if isinstance(row, dict))
            offset += len(rows)
            if not rows or not isinstance(count, int) or offset >= count or offset >= PROJECTS_MAX:
                return projects

    async def list_jobs(self, pipelines: list[str] | None = None, limit: int | None = JOBS_PAGE_LIMIT,
                        progress: bool = False) -> list[JobListItem]:
        """Incomplete async jobs for these pipelines. ``limit=None`` is Antenna's default (one random job).

        ``progress``: the full list (no ``ids_only``), whose rows carry each job's progress, so one
        request also tells how many answers Antenna has saved per job (the REST path's pacing signal).
        Antenna counts only ``ids_only`` polls (and ``/tasks``, ``/result``) as a service's liveness.
        """
        params: dict[str, Any] = {"incomplete_only": 1, "dispatch_mode": "async_api"}
        if not progress:
            params["ids_only"] = 1
        if pipelines:
            params["pipeline__slug__in"] = ",".join(pipelines)
        if limit is not None:
            params["limit"] = limit
        response = await self._request("GET", "/jobs/", params=params)
        try:
            if not progress:
                return JobListResponse.model_validate(response.json()).results
            rows = response.json()["results"]
            return [JobListItem.from_full_row(row) for row in rows]
        except (ValueError, ValidationError, KeyError, TypeError) as exc:
            raise Unavailable(f"GET /jobs/: unreadable answer: {exc}") from exc

    async def reserve_tasks(self, job_id: int, batch_size: int) -> list[PipelineProcessingTask]:
        response = await self._request(
            "POST", f"/jobs/{job_id}/tasks/", json={"batch_size": batch_size, "client_info": client_info(self.worker_name)}
        )
        try:
            return TasksResponse.model_validate(response.json()).tasks
        except (ValueError, ValidationError) as exc:
            raise Unavailable(f"POST /jobs/{job_id}/tasks/: unreadable answer: {exc}") from exc

    async def post_results(self, job_id: int, results: list[TaskResult]) -> ResultsResponse:
        body = ResultsRequest(results=results, client_info=client_info(self.worker_name))
        response = await self._request(
            "POST",
            f"/jobs/{job_id}/result/",
            content=await results_codec.dumps_async(body),  # arrays written as they are, a result at a time
            headers={"Content-Type": "application/json"},
        )
        try:
            return ResultsResponse.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise Unavailable(f"POST /jobs/{job_id}/result/: unreadable answer: {exc}") from exc
