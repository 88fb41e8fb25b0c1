"""Clients for the local API's admin side: create, start, read, list and cancel jobs.

What an operator does in Antenna's UI, over HTTP, for tests, the bench and
the CLI. :class:`AntennaAdmin` is synchronous (scripts, tests, a DevStack from
sync code); :class:`AsyncAntennaAdmin` the same on an event loop (the bench),
an :class:`~antenna_flows.antenna_client.AntennaClient` with admin calls.
Both are members of the one client family: the same response checking and
error taxonomy (:class:`AntennaError` is ``antenna_client.AntennaError``;
``status`` carries the HTTP status), and they identify themselves with
:data:`ADMIN_USER_AGENT`, so the local API does not count their requests as
the workers'.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import httpx

from antenna_flows import __version__
from antenna_flows.antenna_client import (
    AntennaClient,
    AntennaError,
    AuthError,
    Rejected,
    Unavailable,
    auth_headers,
    check_response,
    transport_error,
)
from antenna_lab.antenna.models import Job
from antenna_lab.antenna.demo_images import demo_image_urls

__all__ = [
    "ADMIN_USER_AGENT", "AntennaAdmin", "AntennaError", "AsyncAntennaAdmin", "AuthError", "Rejected", "Unavailable",
    "base_url_of", "job_body",
]

API_SUFFIX = "/api/v2"
ADMIN_USER_AGENT = f"antenna-flows-admin/{__version__}"  # the local API does not count these requests


def base_url_of(api_url: str) -> str:
    """``http://host:port`` from ``http://host:port/api/v2`` (where the demo images are served)."""
    api_url = api_url.rstrip("/")
    return api_url[: -len(API_SUFFIX)] if api_url.endswith(API_SUFFIX) else api_url


def job_body(
    pipeline: str,
    images: int | Sequence[str] | Sequence[dict[str, Any]] = 10,
    *,
    base_url: str,
    image_urls: Sequence[str] | None = None,
    priority: int = 0,
    job_id: int | None = None,
    name: str | None = None,
    project_id: int = 1,
    start: bool = True,
    dispatch_mode: str = "async_api",
    width: int = 640,
    height: int = 480,
    missing: int = 0,
    corrupt: int = 0,
) -> dict[str, Any]:
    """The ``POST /jobs/`` body.

    ``images``: a count of demo frames (``width`` x ``height``, ``missing`` and
    ``corrupt`` of them broken), a list of URLs, or ``{url, id}`` dicts;
    ``image_urls``, when given, is used instead (the API field of that name).
    """
    if image_urls is not None:
        listing: dict[str, Any] = {"image_urls": list(image_urls)}
    elif isinstance(images, int):
        prefix = f"job{job_id}" if job_id is not None else "frame"
        urls = demo_image_urls(base_url, images, width, height, missing=missing, corrupt=corrupt, prefix=prefix)
        listing = {"image_urls": urls}
    elif images and isinstance(images[0], dict):
        listing = {"images": list(images)}
    else:
        listing = {"image_urls": list(images)}
    body = {
        "pipeline": pipeline,
        "priority": priority,
        "project_id": project_id,
        "start": start,
        "dispatch_mode": dispatch_mode,
        **listing,
    }
    if job_id is not None:
        body["id"] = job_id
    if name is not None:
        body["name"] = name
    return body


def _jobs_params(incomplete_only: bool, pipelines: Sequence[str] | None, limit: int, offset: int) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if incomplete_only:
        params["incomplete_only"] = 1
    if pipelines:
        params["pipeline__slug__in"] = ",".join(pipelines)
    return params


def _checked(response: httpx.Response) -> Any:
    """The answer's JSON, or the family's error for it."""
    check_response(response, response.request.method, str(response.request.url))
    try:
        return response.json()
    except ValueError as exc:
        raise Unavailable(f"{response.request.method} {response.request.url}: unreadable answer: {exc}") from exc


class AntennaAdmin:
    """Synchronous admin client (``with AntennaAdmin(url, token) as admin: admin.create_job(...)``)."""

    def __init__(self, api_url: str, token: str, timeout: float = 60.0):
        self.api_url = api_url.rstrip("/")
        self.base_url = base_url_of(self.api_url)
        self.client = httpx.Client(
            base_url=self.api_url + "/", headers=auth_headers(token, ADMIN_USER_AGENT), timeout=timeout
        )

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(exc, method, f"{self.api_url}/{path}") from exc
        return _checked(response)

    def __enter__(self) -> "AntennaAdmin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_job(self, pipeline: str, images: int | Sequence[str] | Sequence[dict[str, Any]] = 10, **options: Any) -> Job:
        """Create (and by default start) a job; options as :func:`job_body`."""
        body = job_body(pipeline, images, base_url=self.base_url, **options)
        return Job.model_validate(self._call("POST", "jobs/", json=body))

    def job(self, job_id: int) -> Job:
        return Job.model_validate(self._call("GET", f"jobs/{job_id}/"))

    def jobs(
        self, *, incomplete_only: bool = False, pipelines: Sequence[str] | None = None, limit: int = 1000, offset: int = 0
    ) -> list[Job]:
        page = self._call("GET", "jobs/", params=_jobs_params(incomplete_only, pipelines, limit, offset))
        return [Job.model_validate(row) for row in page["results"]]

    def run(self, job_id: int) -> Job:
        return Job.model_validate(self._call("POST", f"jobs/{job_id}/run/"))

    def cancel(self, job_id: int) -> Job:
        return Job.model_validate(self._call("POST", f"jobs/{job_id}/cancel/"))

    def wait_final(self, job_id: int, timeout: float = 60.0, poll_s: float = 0.1) -> Job:
        """Poll until the job is SUCCESS, FAILURE or REVOKED; TimeoutError with its last state otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.final:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not final after {timeout}s: {job.status}, {job.processed}/{job.total}")
            time.sleep(poll_s)


class AsyncAntennaAdmin(AntennaClient):
    """The same on an event loop (``async with AsyncAntennaAdmin(url, token) as admin: ...``): an
    :class:`AntennaClient` (so ``list_jobs``, ``reserve_tasks``, ``post_results`` too) with admin calls."""

    user_agent = ADMIN_USER_AGENT

    def __init__(self, api_url: str, token: str, timeout: float = 60.0):
        super().__init__(api_url, token, timeout_s=timeout, worker_name="antenna-flows-admin")
        self.api_url = self.base_url
        self.client = self.http  # the name the sync admin uses

    async def __aenter__(self) -> "AsyncAntennaAdmin":
        return self

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(exc, method, f"{self.api_url}{path}") from exc
        return _checked(response)

    async def create_job(
        self, pipeline: str, images: int | Sequence[str] | Sequence[dict[str, Any]] = 10, **options: Any
    ) -> Job:
        body = job_body(pipeline, images, base_url=base_url_of(self.api_url), **options)
        return Job.model_validate(await self._call("POST", "/jobs/", json=body))

    async def job(self, job_id: int) -> Job:
        return Job.model_validate(await self._call("GET", f"/jobs/{job_id}/"))

    async def jobs(
        self, *, incomplete_only: bool = False, pipelines: Sequence[str] | None = None, limit: int = 1000, offset: int = 0
    ) -> list[Job]:
        page = await self._call("GET", "/jobs/", params=_jobs_params(incomplete_only, pipelines, limit, offset))
        return [Job.model_validate(row) for row in page["results"]]

    async def run(self, job_id: int) -> Job:
        return Job.model_validate(await self._call("POST", f"/jobs/{job_id}/run/"))

    async def cancel(self, job_id: int) -> Job:
        return Job.model_validate(await self._call("POST", f"/jobs/{job_id}/cancel/"))

    async def wait_final(self, job_id: int, timeout: float = 60.0, poll_s: float = 0.1) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job.final:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not final after {timeout}s: {job.status}, {job.processed}/{job.total}")
            await asyncio.sleep(poll_s)
