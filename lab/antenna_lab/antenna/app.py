"""The local Antenna: its job-plane REST API (``/api/v2``) on real NATS JetStream, as a FastAPI app.

Same paths, fields, status codes and error shapes as Antenna (Django REST
Framework), so a worker that passes against this passes against Antenna:
DRF's token auth (401 with ``WWW-Authenticate: Token``), DRF-shaped 400s
(field error dicts, ``JSON parse error - ...``), ``{"detail": "Not found."}``,
503 ``{"error": ...}`` while NATS is unreachable, and never FastAPI's 422.

Results are saved in the background after the answer, and acked only after
their save, as Antenna's Celery does (see :mod:`.jobplane`); docs/antenna-parity.md
lists every point a worker can observe.

Extensions Antenna lacks, for a local platform: ``POST /jobs/`` (create a job
from image URLs, with a ``priority``), ``priority`` in job listings, a job
object with progress and queue statistics, synthetic demo images under
``/images/`` (no auth), fault switches (:meth:`LocalAntenna.fail_api`,
``fail_saves``, ``slow_saves``, ``slow_api``) and per-endpoint counts of the
workers' requests (:meth:`LocalAntenna.request_counts`; the admin clients'
own requests, sent with :data:`ADMIN_USER_AGENT`, are not counted).
"""

from __future__ import annotations

import asyncio
import datetime
import html
import logging
import math
import time
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from antenna_lab.antenna.drf import (
    AUTH_MISSING,
    NOT_FOUND,
    BadRequest,
    authenticate,
    field_errors,
    parse_json,
    validate,
)
from antenna_lab.antenna.costs import AntennaCosts, Cpu, WebWorkers
from antenna_lab.antenna.jobplane import SAVE_WORKERS, JobPlane, NatsUnavailable
from antenna_lab.antenna.models import Job, JobCreate
from antenna_lab.antenna.store import PipelineNotConfigured, Store
from antenna_lab.antenna.demo_images import DemoImages, valid_size
from antenna_flows.jetstream import QueueConfig
from antenna_flows.schemas import (
    PipelineRegistrationRequest,
    PipelineRegistrationResponse,
    PipelineResultsError,
    PipelineResultsResponse,
    TaskResult,
    TasksRequest,
    TasksResponse,
)
from antenna_flows.settings import DEFAULT_TOKEN

log = logging.getLogger(__name__)

API_PREFIX = "/api/v2"
DEFAULT_PAGE_SIZE = 100
HOUSEKEEPING_INTERVAL_S = 1.0
HOUSEKEEPING_STOP_TIMEOUT_S = 5.0  # a round blocked on a NATS call gives up after its 5 s timeout
MAX_BODY_BYTES = 32 * 1024 * 1024
BODY_METHODS = ("POST", "PUT", "PATCH")
ADMIN_USER_AGENT_PREFIX = "antenna-flows-admin"  # requests from the admin clients: not counted as the workers'
REQUEST_CLASSES = ("jobs", "tasks", "result", "other")
HEARTBEAT_THROTTLE_S = 30.0  # Antenna's HEARTBEAT_THROTTLE_SECONDS (ami/jobs/tasks.py)
ONLINE_WINDOW_S = 60.0  # Antenna's PROCESSING_SERVICE_LAST_SEEN_MAX (ami/ml/models/processing_service.py)
_ON_WEB_WORKER: ContextVar[bool] = ContextVar("on_web_worker", default=False)  # a worker request holding a web worker


class LocalAntenna:
    """What the app's handlers share (``app.state.antenna``): the job plane, the token, images, faults."""

    def __init__(
        self, plane: JobPlane, token: str, max_body_bytes: int, costs: AntennaCosts | None = None, cpu: Cpu | None = None
    ):
        self.plane = plane
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.costs = costs
        self.web = WebWorkers(costs, cpu) if costs is not None else None  # None: requests cost nothing
        self.heartbeat_throttle_s = HEARTBEAT_THROTTLE_S
        self.online_window_s = ONLINE_WINDOW_S
        self._heartbeats: dict[str, float] = {}  # throttle key -> when it last marked services seen
        self.images = DemoImages()
        self._api_down_until = 0.0
        self._slow_api_until = 0.0
        self._slow_api_delay_s = 0.0
        self._requests = dict.fromkeys(REQUEST_CLASSES, 0)

    @property
    def store(self) -> Store:
        return self.plane.store

    def fail_api(self, seconds: float) -> None:
        """Answer 503 on every ``/api/v2`` endpoint for ``seconds`` (the bench's ``api_errors`` fault)."""
        self._api_down_until = time.monotonic() + seconds
        log.warning("fault: the API answers 503 for %.1fs", seconds)

    @property
    def api_failing(self) -> bool:
        return time.monotonic() < self._api_down_until

    def fail_saves(self, seconds: float, fraction: float = 1.0) -> None:
        """For ``seconds``, ``fraction`` of background result saves fail (seeded): not stored, not acked."""
        self.plane.fail_saves(seconds, fraction)

    def slow_saves(self, seconds: float, delay_s: float) -> None:
        """For ``seconds``, background saves, and so their acks, lag by ``delay_s``."""
        self.plane.slow_saves(seconds, delay_s)

    def slow_api(self, seconds: float, delay_s: float) -> None:
        """For ``seconds``, every ``/api/v2`` answer is delayed by ``delay_s``."""
        self._slow_api_until = time.monotonic() + seconds
        self._slow_api_delay_s = max(delay_s, 0.0)
        log.warning("fault: every API answer delayed by %.2fs for %.1fs", delay_s, seconds)

    @property
    def api_delay_s(self) -> float:
        return self._slow_api_delay_s if time.monotonic() < self._slow_api_until else 0.0

    def count_request(self, method: str, path: str, user_agent: str) -> None:
        """Count a worker's request by endpoint class (admin clients' requests are not counted)."""
        if user_agent.startswith(ADMIN_USER_AGENT_PREFIX):
            return
        self._requests[request_class(method, path)] += 1

    def heartbeat(self, *, slugs: list[str] | None = None, project_id: int | None = None) -> None:
        """Mark the processing services a worker's poll speaks for as seen, at most once per
        ``heartbeat_throttle_s`` per throttle key, as Antenna's views do (``ami/jobs/views.py``
        ``_mark_async_services_seen_for_pipelines`` keyed by the sorted slugs,
        ``_mark_async_services_seen_for_project`` by project, ``_mark_pipeline_pull_services_seen``
        by (pipeline, project))."""
        if slugs is not None and project_id is not None:
            key = f"pipeline:{','.join(slugs)}:project:{project_id}"
        elif slugs is not None:
            key = "list:pipelines:" + ",".join(sorted(slugs))
        else:
            key = f"list:project:{project_id}"
        now = time.monotonic()
        if now - self._heartbeats.get(key, -math.inf) < self.heartbeat_throttle_s:
            return
        self._heartbeats[key] = now
        self.store.mark_services_seen(slugs=slugs, project_id=project_id)

    async def charge_results(self, n: int) -> None:
        """A result post's per-result cost, on the web worker the request holds (none for admin requests)."""
        if self.web is not None and _ON_WEB_WORKER.get():
            await self.web.charge(self.costs.request_s.result_per_item * n)  # type: ignore[union-attr]

    def request_counts(self) -> dict[str, int]:
        """Requests the workers made to ``/api/v2``: ``{"jobs", "tasks", "result", "other"}``."""
        return dict(self._requests)

    def reset_request_counts(self) -> None:
        self._requests = dict.fromkeys(REQUEST_CLASSES, 0)


def request_class(method: str, path: str) -> str:
    """``jobs`` (GET /jobs/), ``tasks`` (POST /jobs/{id}/tasks/), ``result`` (POST /jobs/{id}/result/) or ``other``."""
    parts = [p for p in path[len(API_PREFIX):].split("/") if p]
    if method == "GET" and parts == ["jobs"]:
        return "jobs"
    if method == "POST" and len(parts) == 3 and parts[0] == "jobs" and parts[1].isdigit():
        if parts[2] == "tasks":
            return "tasks"
        if parts[2] == "result":
            return "result"
    return "other"


def create_app(
    store: Store,
    nats_url: str,
    *,
    token: str = DEFAULT_TOKEN,
    queue_config: QueueConfig | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    housekeeping_interval_s: float = HOUSEKEEPING_INTERVAL_S,
    save_workers: int = SAVE_WORKERS,
    reap_dead_letters: bool = False,
    seed: int = 0,
    costs: AntennaCosts | None = None,
    heartbeat_throttle_s: float = HEARTBEAT_THROTTLE_S,
    online_window_s: float = ONLINE_WINDOW_S,
) -> FastAPI:
    """The app; it connects to NATS and starts its save workers and housekeeping when its lifespan starts.

    ``reap_dead_letters``: turn tasks that exhausted ``max_deliver`` into error
    results marked ``dead_lettered`` (off, as in Antenna, where only a
    management command or the stale-job reaper does that later).
    ``costs``: what requests and saves cost (:mod:`.costs`); its ``save_workers`` replaces
    ``save_workers``. None: nothing is charged.
    ``heartbeat_throttle_s``, ``online_window_s``: Antenna's liveness (30 s, 60 s), shorter in tests.
    """
    cpu = None
    if costs is not None:
        save_workers = costs.save_workers
        cpu = Cpu(costs.cpu_cores)  # one machine: web workers and save workers share its cores
    plane = JobPlane(
        store, nats_url, queue_config, save_workers=save_workers, reap_dead_letters=reap_dead_letters, seed=seed,
        save_s_per_result=costs.save_s_per_result if costs is not None else 0.0, cpu=cpu,
    )
    antenna = LocalAntenna(plane, token, max_body_bytes, costs, cpu)
    antenna.heartbeat_throttle_s = heartbeat_throttle_s
    antenna.online_window_s = online_window_s

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await antenna.plane.connect()
        antenna.plane.start_savers()
        housekeeping = asyncio.create_task(antenna.plane.housekeeping(housekeeping_interval_s))
        try:
            yield
        finally:
            await antenna.plane.stop_savers()
            antenna.plane.stop_housekeeping()
            await asyncio.wait({housekeeping}, timeout=HOUSEKEEPING_STOP_TIMEOUT_S)
            housekeeping.cancel()
            await antenna.plane.close()

    app = FastAPI(title="antenna-flows local Antenna", lifespan=lifespan)
    app.state.antenna = antenna
    app.add_middleware(_Guard, antenna=antenna)
    app.include_router(public, prefix=API_PREFIX)
    app.include_router(api, prefix=API_PREFIX)
    app.include_router(images)
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(NatsUnavailable, _nats_unavailable)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


# --- plumbing ---------------------------------------------------------------------------


class _Guard:
    """Pure ASGI, ahead of routing: the 503 fault switch, then the body size limit (413).

    The body is read here (declared ``Content-Length`` first, then what
    actually arrives, so a chunked upload cannot get around the limit) and
    replayed to the app.
    """

    def __init__(self, app: ASGIApp, antenna: LocalAntenna):
        self.app = app
        self.antenna = antenna

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        web_class = None
        if scope["path"].startswith(API_PREFIX):
            user_agent = dict(scope["headers"]).get(b"user-agent", b"").decode("latin-1")
            self.antenna.count_request(scope["method"], scope["path"], user_agent)
            if self.antenna.web is not None and not user_agent.startswith(ADMIN_USER_AGENT_PREFIX):
                web_class = request_class(scope["method"], scope["path"])
            delay = self.antenna.api_delay_s
            if delay:
                await asyncio.sleep(delay)
        if scope["path"].startswith(API_PREFIX) and self.antenna.api_failing:
            response = JSONResponse({"detail": "Service temporarily unavailable (injected fault)."}, 503)
            return await response(scope, receive, send)
        if scope["method"] not in BODY_METHODS:
            return await self._dispatch(scope, receive, send, web_class)
        limit = self.antenna.max_body_bytes
        headers = dict(scope["headers"])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            return await _too_large(declared, limit)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await _too_large(size, limit)(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._dispatch(scope, replay, send, web_class)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, web_class: str | None) -> None:
        """The request, on a web worker when requests cost something (a worker's, not an admin's)."""
        if web_class is None or self.antenna.web is None:
            return await self.app(scope, receive, send)
        async with self.antenna.web.serve(web_class):
            token = _ON_WEB_WORKER.set(True)
            try:
                await self.app(scope, receive, send)
            finally:
                _ON_WEB_WORKER.reset(token)


def _too_large(size: int, limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"Request body too large: {size} bytes (limit {limit})."}, 413)


def _antenna(request: Request) -> LocalAntenna:
    return request.app.state.antenna


def _authenticated(request: Request) -> None:
    """DRF TokenAuthentication: ``Authorization: Token <token>``."""
    problem = authenticate(request.headers.get("authorization"), _antenna(request).token)
    if problem:
        raise HTTPException(401, problem, headers={"WWW-Authenticate": "Token"})


def _anonymous_or_authenticated(request: Request) -> None:
    """DRF's AllowAny read: no credentials is fine, but a Token header that is wrong is still a 401."""
    problem = authenticate(request.headers.get("authorization"), _antenna(request).token)
    if problem and problem != AUTH_MISSING:
        raise HTTPException(401, problem, headers={"WWW-Authenticate": "Token"})


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body validated against ``model`` (DRF's 415, 400 and parse errors)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise HTTPException(415, f'Unsupported media type "{media_type}" in request.')
    return validate(model, parse_json(await request.body()))


def _job_or_404(antenna: LocalAntenna, job_id: int) -> Job:
    job = antenna.store.job(job_id)
    if job is None:
        raise HTTPException(404, NOT_FOUND)
    return job


def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BadRequest)
    return JSONResponse(exc.body, 400)


def _nats_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("503 for %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": str(exc)}, 503)


def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 never leaves: a bad path parameter is a 404 (no such URL in Django), the rest 400."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e["loc"][:1] == ("path",) for e in errors):
        return JSONResponse({"detail": NOT_FOUND}, 404)
    return JSONResponse(field_errors([{**e, "loc": tuple(e["loc"][1:])} for e in errors]), 400)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail: Any = exc.detail
    if exc.status_code == 404:
        detail = NOT_FOUND
    elif exc.status_code == 405:
        detail = f'Method "{request.method}" not allowed.'
    return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)


# --- /api/v2 ------------------------------------------------------------------------------

api = APIRouter(dependencies=[Depends(_authenticated)])
public = APIRouter(dependencies=[Depends(_anonymous_or_authenticated)])  # Antenna serves GET /jobs/ anonymously


@public.get("/jobs/")
async def list_jobs(request: Request) -> dict[str, Any]:
    """Antenna's job list; with ``ids_only`` random order and ``limit=1`` by default (Antenna PR #1261)."""
    q = request.query_params
    ids_only = _flag(q.get("ids_only"))
    slugs = [s.strip() for s in q.get("pipeline__slug__in", "").split(",") if s.strip()]
    limit = _positive_int(q.get("limit"), 1 if ids_only else DEFAULT_PAGE_SIZE)
    offset = _positive_int(q.get("offset"), 0, allow_zero=True)
    if ids_only:  # a worker's poll: its liveness (Antenna's JobViewSet.list)
        project = _positive_int(q.get("project_id"), 0)
        if slugs:
            _antenna(request).heartbeat(slugs=slugs)
        elif project:
            _antenna(request).heartbeat(project_id=project)
    count, jobs = _antenna(request).store.list_jobs(
        pipelines=slugs or None,
        incomplete_only=_flag(q.get("incomplete_only")),
        dispatch_mode=q.get("dispatch_mode") or None,
        order="random" if ids_only else "newest",
        limit=limit,
        offset=offset,
    )
    if ids_only:
        rows: list[dict[str, Any]] = [{"id": j.id, "pipeline_slug": j.pipeline_slug, "priority": j.priority} for j in jobs]
    else:
        rows = [_job_json(j) for j in jobs]
    next_url, previous_url = _page_links(request, count, limit, offset)
    return {"count": count, "next": next_url, "previous": previous_url, "results": rows}


def _job_json(job: Job) -> dict[str, Any]:
    """Our job object (progress and queue statistics in one place) with the fields Antenna's job
    serializer gives a worker: ``pipeline`` and ``project`` nested, ``progress`` with its stages."""
    return {**job.model_dump(mode="json"), **job.antenna_fields()}


def _page_links(request: Request, count: int, limit: int, offset: int) -> tuple[str | None, str | None]:
    """DRF ``LimitOffsetPagination``'s ``next`` and ``previous`` URLs."""
    url = request.url
    next_url = str(url.include_query_params(limit=limit, offset=offset + limit)) if offset + limit < count else None
    previous_url = None
    if offset > 0:
        previous_url = str(
            url.include_query_params(limit=limit).remove_query_params("offset")
            if offset - limit <= 0
            else url.include_query_params(limit=limit, offset=offset - limit)
        )
    return next_url, previous_url


@api.post("/jobs/", status_code=201)
async def create_job(request: Request) -> dict[str, Any]:
    """Our admin extension: a job from image URLs and a pipeline; its tasks are published at once."""
    body: JobCreate = await _body(request, JobCreate)
    job = await _antenna(request).plane.create_job(body)
    return _job_json(job)


@api.get("/jobs/{job_id:int}/")
async def get_job(request: Request, job_id: int) -> dict[str, Any]:
    antenna = _antenna(request)
    job = await antenna.plane.live(_job_or_404(antenna, job_id))
    return _job_json(job)


@api.post("/jobs/{job_id:int}/run/")
async def run_job(request: Request, job_id: int) -> dict[str, Any]:
    """Start a job created with ``start: false`` (Antenna's run action)."""
    antenna = _antenna(request)
    job = await antenna.plane.run_job(_job_or_404(antenna, job_id))
    return _job_json(job)


@api.post("/jobs/{job_id:int}/cancel/")
async def cancel_job(request: Request, job_id: int) -> dict[str, Any]:
    """REVOKED, and its stream, consumer and dead-letter consumer deleted (as Antenna does)."""
    antenna = _antenna(request)
    job = await antenna.plane.cancel(_job_or_404(antenna, job_id))
    return _job_json(job)


@api.post("/jobs/{job_id:int}/tasks/")
async def reserve_tasks(request: Request, job_id: int) -> dict[str, Any]:
    """Antenna's order: the body is validated (400) before the job is looked up (404)."""
    antenna = _antenna(request)
    body: TasksRequest = await _body(request, TasksRequest)
    job = _job_or_404(antenna, job_id)
    tasks = await antenna.plane.reserve(
        job, body.batch_size, seen=lambda: antenna.heartbeat(slugs=[job.pipeline_slug], project_id=job.project_id)
    )
    return TasksResponse(tasks=tasks).model_dump(mode="json")


class _ResultEnvelope(BaseModel):
    reply_subject: str = Field(min_length=1)
    result: dict[str, Any]


class _ResultsBody(BaseModel):
    results: list[_ResultEnvelope]
    client_info: dict[str, Any] | None = None


@api.post("/jobs/{job_id:int}/result/")
async def post_results(request: Request, job_id: int) -> dict[str, Any]:
    """Antenna's order: the job (404), then every result (400, all or nothing); then each is queued for a
    background save, which acks it after saving. Any ``reply_subject`` string is accepted."""
    antenna = _antenna(request)
    job = _job_or_404(antenna, job_id)
    antenna.heartbeat(slugs=[job.pipeline_slug], project_id=job.project_id)
    body: _ResultsBody = await _body(request, _ResultsBody)
    results = _task_results(body)
    await antenna.charge_results(len(results))
    response = await antenna.plane.accept_results(job, results)
    return response.model_dump(mode="json")


def _task_results(body: _ResultsBody) -> list[TaskResult]:
    """Each result as the one model it claims to be: an error (``error``, no ``pipeline``) or a success."""
    errors: dict[str, Any] = {}
    out = []
    for i, item in enumerate(body.results):
        is_error = "error" in item.result and "pipeline" not in item.result
        model = PipelineResultsError if is_error else PipelineResultsResponse
        try:
            result = model.model_validate(item.result)
        except ValidationError as exc:
            field_errors(exc.errors(include_url=False), ("results", i, "result"), into=errors)
            continue
        out.append(TaskResult.model_construct(reply_subject=item.reply_subject, result=result))
    if errors:
        errors["results"] += [{}] * (len(body.results) - len(errors["results"]))
        raise BadRequest(errors)
    return out


PROJECT_PAGE_SIZE = 40  # Antenna's ProjectPagination.default_limit


def _project_row(request: Request, row: dict[str, Any]) -> dict[str, Any]:
    """Antenna's ``ProjectListSerializer`` fields, plus the per-object ``user_permissions`` DRF adds."""
    return {
        "id": row["id"],
        "name": row["name"],
        "description": row["description"],
        "details": str(request.url_for("get_project", project_id=row["id"])),
        "deployments_count": row["deployments_count"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "image": None,
        "draft": False,
        "user_permissions": [],
    }


@public.get("/projects/")
async def list_projects(request: Request) -> dict[str, Any]:
    """Antenna's ``ProjectViewSet`` list: limit/offset pages of 40 (what ``ami worker register`` reads with
    no project named: every ``results[].id``). Every project is visible (the stand-in has one user)."""
    q = request.query_params
    limit = _positive_int(q.get("limit"), PROJECT_PAGE_SIZE)
    offset = _positive_int(q.get("offset"), 0, allow_zero=True)
    count, rows = _antenna(request).store.projects(limit=limit, offset=offset)
    next_url, previous_url = _page_links(request, count, limit, offset)
    return {
        "count": count,
        "next": next_url,
        "previous": previous_url,
        "results": [_project_row(request, r) for r in rows],
        "user_permissions": [],
    }


@public.get("/projects/{project_id:int}/")
async def get_project(request: Request, project_id: int) -> dict[str, Any]:
    row = _antenna(request).store.project(project_id)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    return _project_row(request, row)


def _iso(unix_s: float) -> str:
    """Antenna's datetimes as DRF renders them (naive ISO 8601, microseconds)."""
    return datetime.datetime.fromtimestamp(unix_s).isoformat(timespec="microseconds")


@api.post("/projects/{project_id:int}/pipelines/", status_code=201)
async def register_pipelines(request: Request, project_id: int) -> Any:
    """A processing service announces its pipelines and their algorithms (201, Antenna's answer shape)."""
    body: PipelineRegistrationRequest = await _body(request, PipelineRegistrationRequest)
    try:
        outcome = _antenna(request).store.register(
            project_id, body.processing_service_name, [p.model_dump(mode="json") for p in body.pipelines]
        )
    except PipelineNotConfigured as exc:
        log.warning("project %s: registration by %s refused: PipelineNotConfigured: %s",
                    project_id, body.processing_service_name, exc)
        return _server_error(request, exc)
    log.info(
        "project %s: %s registered pipelines %s (%d algorithms created)",
        project_id, body.processing_service_name, outcome.pipelines_created + outcome.pipelines_updated,
        len(outcome.algorithms_created),
    )
    return PipelineRegistrationResponse(
        success=True,
        pipelines=body.pipelines,
        pipelines_created=outcome.pipelines_created,
        algorithms_created=outcome.algorithms_created,
    ).model_dump(mode="json")


def _server_error(request: Request, exc: Exception) -> Response:
    """An exception Antenna does not handle: Django's 500 page, as Antenna's ``DEBUG`` harness shows it
    (the exception's name and message; production's page says only "Server Error")."""
    title = html.escape(f"{type(exc).__name__} at {request.url.path}")
    body = (f"<!DOCTYPE html><html><head><title>{title}</title></head><body><h1>{title}</h1>"
            f'<pre class="exception_value">{html.escape(str(exc))}</pre></body></html>')
    return Response(body, 500, media_type="text/html; charset=utf-8")


# --- processing services (Antenna's /ml/processing_services/) -------------------------------------

SERVICE_PAGE_SIZE = 10  # Antenna's REST_FRAMEWORK PAGE_SIZE


def _service_row(request: Request, row: dict[str, Any]) -> dict[str, Any]:
    """Antenna's ``ProcessingServiceSerializer`` (``ami/ml/serializers.py``): an async (pull-mode)
    service, its pipelines, ``last_seen`` and ``last_seen_live``. Live: seen within the online window
    (60 s: ``PROCESSING_SERVICE_LAST_SEEN_MAX``, which Antenna's periodic
    ``check_processing_services_online`` enforces; here read at once)."""
    antenna = _antenna(request)
    seen = row["last_seen_at"]
    pipelines = []
    for slug in row["pipelines"]:
        config = antenna.store.pipeline_config(row["project_id"], slug) or {}
        pipelines.append({"slug": slug, "name": config.get("name", slug), "description": config.get("description") or "",
                          "version": config.get("version", 1), "version_name": config.get("version_name") or ""})
    created = row.get("created_at") or seen
    return {
        "id": row["id"],
        "details": str(request.url_for("get_processing_service", service_id=row["id"])),
        "name": row["name"],
        "description": "",
        "projects": [row["project_id"]],
        "endpoint_url": None,
        "is_async": True,
        "pipelines": pipelines,
        "created_at": _iso(created),
        "updated_at": _iso(seen),
        "last_seen": _iso(seen) if seen else None,
        "last_seen_live": bool(seen) and time.time() - seen <= antenna.online_window_s,
        "user_permissions": [],
    }


@api.get("/ml/processing_services/")
async def list_processing_services(request: Request) -> dict[str, Any]:
    q = request.query_params
    limit = _positive_int(q.get("limit"), SERVICE_PAGE_SIZE)
    offset = _positive_int(q.get("offset"), 0, allow_zero=True)
    project = _positive_int(q.get("project_id"), 0)
    rows = _antenna(request).store.processing_services(project or None)
    next_url, previous_url = _page_links(request, len(rows), limit, offset)
    return {"count": len(rows), "next": next_url, "previous": previous_url,
            "results": [_service_row(request, r) for r in rows[offset:offset + limit]], "user_permissions": []}


@api.get("/ml/processing_services/{service_id:int}/")
async def get_processing_service(request: Request, service_id: int) -> dict[str, Any]:
    row = next((r for r in _antenna(request).store.processing_services() if r["id"] == service_id), None)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    return _service_row(request, row)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _positive_int(value: str | None, default: int, allow_zero: bool = False) -> int:
    """DRF's pagination parsing: anything invalid falls back to the default."""
    try:
        number = int(value) if value is not None else default
    except ValueError:
        return default
    return number if number > 0 or (allow_zero and number == 0) else default


# --- demo images (no auth, as image URLs in Antenna) -----------------------------------------

images = APIRouter(prefix="/images")


@images.get("/demo/{width:int}x{height:int}/{name}.jpg")
def demo_image(request: Request, width: int, height: int, name: str) -> Response:
    """A synthetic frame, the same bytes for the same size and name (generated off the event loop)."""
    if not valid_size(width, height):
        raise HTTPException(404, NOT_FOUND)
    data = _antenna(request).images.jpeg(width, height, name)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


@images.get("/missing/{name}.jpg")
def missing_image(name: str) -> Response:
    raise HTTPException(404, NOT_FOUND)


@images.get("/corrupt/{name}.jpg")
def corrupt_image(request: Request, name: str) -> Response:
    """A JPEG whose header reads but whose pixels never decode."""
    return Response(_antenna(request).images.corrupt_jpeg(name), media_type="image/jpeg")
