"""The worker's HTTP client for Antenna's API (one pooled httpx client per worker).

Only what a worker needs: list incomplete jobs, reserve tasks through the REST
endpoint (the drain baseline and the REST transport), post results. Errors are
sorted into what a caller can act on: :class:`AuthError` (wrong token: stop),
:class:`Rejected` (4xx: retrying will not help), :class:`Unavailable`
(5xx, timeouts, connection errors: retry later).
"""

from __future__ import annotations

import logging
import platform
import socket
from typing import Any

import httpx
from pydantic import ValidationError

from antenna_flows import __version__
from antenna_flows.schemas import (
    JobListItem,
    JobListResponse,
    PipelineProcessingTask,
    ResultsRequest,
    ResultsResponse,
    TaskResult,
    TasksResponse,
)

log = logging.getLogger(__name__)

JOBS_PAGE_LIMIT = 1000


class AntennaError(Exception):
    pass


class AuthError(AntennaError):
    """401/403: the token is wrong or lacks permission. Retrying will not help."""


class Rejected(AntennaError):
    """A 4xx other than auth: the request itself is wrong (or the job is gone: 404)."""

    def __init__(self, status: int, body: str, url: str):
        super().__init__(f"HTTP {status} from {url}: {body[:500]}")
        self.status = status
        self.body = body


class Unavailable(AntennaError):
    """5xx, timeout or connection failure: Antenna may answer later."""


def client_info(worker_name: str) -> dict[str, Any]:
    return {
        "worker": worker_name,
        "hostname": socket.gethostname(),
        "software": "antenna-flows",
        "version": __version__,
        "platform": platform.platform(),
    }


class AntennaClient:
    def __init__(self, base_url: str, token: str, *, timeout_s: float = 30.0, worker_name: str = "antenna-flows"):
        self.base_url = base_url.rstrip("/")
        self.worker_name = worker_name
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Token {token}", "User-Agent": f"antenna-flows/{__version__}"},
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Unavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (401, 403):
            raise AuthError(f"{method} {self.base_url}{path}: HTTP {response.status_code} {response.text[:200]}")
        if response.status_code >= 500:
            raise Unavailable(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
        if response.status_code >= 400:
            raise Rejected(response.status_code, response.text, f"{method} {path}")
        return response

    async def list_jobs(self, pipelines: list[str] | None = None, limit: int | None = JOBS_PAGE_LIMIT) -> list[JobListItem]:
        """Incomplete async jobs for these pipelines. ``limit=None`` is Antenna's default (one random job)."""
        params: dict[str, Any] = {"ids_only": 1, "incomplete_only": 1, "dispatch_mode": "async_api"}
        if pipelines:
            params["pipeline__slug__in"] = ",".join(pipelines)
        if limit is not None:
            params["limit"] = limit
        response = await self._request("GET", "/jobs/", params=params)
        try:
            return JobListResponse.model_validate(response.json()).results
        except (ValueError, ValidationError) as exc:
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
            content=body.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )
        try:
            return ResultsResponse.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise Unavailable(f"POST /jobs/{job_id}/result/: unreadable answer: {exc}") from exc
