"""The whole local job plane in one object: NATS JetStream plus the Antenna-compatible API.

``antenna-flows devstack`` runs one in the foreground; tests, the bench and
the demo run one in-process. The API serves from a background thread with its
own event loop and its own NATS connection, so sync code (a test, a CLI
command) and async code (the bench) can both drive it, and a fault injected
here (NATS restart, API errors) looks to a worker exactly like one in
production.

>>> with DevStack() as stack:  # doctest: +SKIP
...     job = stack.create_job("panama_moths_2024", 20)
...     print(stack.api_url, stack.token, job.id)
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import uvicorn

from antenna_lab.antenna.admin import AntennaAdmin
from antenna_lab.antenna.app import (
    HEARTBEAT_THROTTLE_S,
    HOUSEKEEPING_INTERVAL_S,
    ONLINE_WINDOW_S,
    LocalAntenna,
    create_app,
)
from antenna_lab.antenna.costs import AntennaCosts
from antenna_lab.antenna.jobplane import SAVE_WORKERS
from antenna_lab.antenna.models import Job
from antenna_lab.antenna.store import Store
from antenna_flows.jetstream import QueueConfig
from antenna_lab.antenna.natsserver import EmbeddedNats
from antenna_lab.settings import ApiSettings, QueueSettings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
DB_NAME = "antenna.sqlite3"
DEFAULT_REGISTER_KINDS = ("sim", "ami")
DEFAULT_PROJECT_ID = 1
PREREGISTERED_SERVICE = "antenna-flows devstack ({kind}, pre-registered)"


class DevStack:
    """NATS (embedded unless a URL is given) and the API on ``api.api_host:api.api_port``.

    Without ``api`` settings the stack is ephemeral: a free port and a
    temporary data directory (database and NATS store) removed on stop. With
    them, state lives in ``api.data_dir`` and survives restarts. Queue
    settings (ack_wait, max_deliver, max_ack_pending) apply to jobs created
    from then on.
    """

    def __init__(
        self,
        queue: QueueSettings | None = None,
        api: ApiSettings | None = None,
        *,
        nats_url: str | None = None,
        nats_port: int = 0,
        housekeeping_interval_s: float = HOUSEKEEPING_INTERVAL_S,
        register_kinds: Sequence[str] = DEFAULT_REGISTER_KINDS,
        register_projects: Sequence[int] = (DEFAULT_PROJECT_ID,),
        reap_dead_letters: bool = False,
        save_workers: int = SAVE_WORKERS,
        seed: int = 0,
        costs: AntennaCosts | None = None,
        heartbeat_throttle_s: float = HEARTBEAT_THROTTLE_S,
        online_window_s: float = ONLINE_WINDOW_S,
    ):
        """``register_kinds``: model kinds whose algorithms are registered for every registry pipeline
        in ``register_projects`` when the stack starts (what an operator's ``antenna-flows register``
        does before starting workers; a result naming an unregistered algorithm is refused at save
        time and never acked). ``reap_dead_letters``: turn tasks that exhausted max_deliver into error
        results marked ``dead_lettered`` (off, as in Antenna; the bench and the demo turn it on).
        ``save_workers``: concurrent background result saves; ``seed``: the save-fault RNG.
        ``costs``: what requests and saves cost (:mod:`antenna_lab.antenna.costs`; default: the
        file in ``api.antenna_costs``, else nothing is charged); its ``save_workers`` wins.
        ``heartbeat_throttle_s``, ``online_window_s``: processing-service liveness as Antenna's (a poll
        marks services seen at most every 30 s; a service seen within 60 s is live), shorter in tests."""
        self.queue_settings = queue or QueueSettings()
        self._temp_dir: Path | None = None
        if api is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="antenna-devstack-"))
            api = ApiSettings(api_port=0, data_dir=self._temp_dir)
        self.api_settings = api
        self._external_nats = nats_url or self.queue_settings.nats_url
        self._nats_port = nats_port
        self._housekeeping_interval_s = housekeeping_interval_s
        self.register_kinds = tuple(register_kinds)
        self.register_projects = tuple(register_projects)
        self.reap_dead_letters = reap_dead_letters
        self.save_workers = save_workers
        self.seed = seed
        if costs is None and api.antenna_costs is not None:
            costs = AntennaCosts.load(api.antenna_costs)
        self.costs = costs
        self.heartbeat_throttle_s = heartbeat_throttle_s
        self.online_window_s = online_window_s
        self.nats: EmbeddedNats | None = None
        self._store: Store | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._app_state: LocalAntenna | None = None
        self._admin: AntennaAdmin | None = None
        self._port = 0

    # --- where things are ------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self._client_host}:{self._port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v2"

    @property
    def token(self) -> str:
        return self.api_settings.api_token

    @property
    def nats_url(self) -> str:
        if self._external_nats:
            return self._external_nats
        if self.nats is None:
            raise RuntimeError("DevStack not started")
        return self.nats.url

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("DevStack not started")
        return self._store

    @property
    def antenna(self) -> LocalAntenna:
        """The running app's shared state (job plane, fault switch)."""
        if self._app_state is None:
            raise RuntimeError("DevStack not started")
        return self._app_state

    @property
    def admin(self) -> AntennaAdmin:
        """A synchronous admin client for this stack (closed with it)."""
        if self._admin is None:
            self._admin = AntennaAdmin(self.api_url, self.token)
        return self._admin

    @property
    def data_dir(self) -> Path:
        return self.api_settings.data_dir

    @property
    def _client_host(self) -> str:
        host = self.api_settings.api_host
        return "127.0.0.1" if host in ("0.0.0.0", "") else host

    @property
    def queue_config(self) -> QueueConfig:
        q = self.queue_settings
        return QueueConfig(ack_wait_s=q.nats_task_ttr, max_deliver=q.nats_max_deliver, max_ack_pending=q.nats_max_ack_pending)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> "DevStack":
        try:
            self._start_nats()
            db_path = self.api_settings.api_db_path or self.data_dir / DB_NAME
            self._store = Store(db_path)
            self._preregister()
            self._start_api()
        except BaseException:
            self.stop()
            raise
        log.info("devstack up: API %s, NATS %s, database %s", self.api_url, self.nats_url, self._store.path)
        return self

    def _preregister(self) -> None:
        """Register what each of ``register_kinds`` declares (``declared_pipelines``): ``ami`` on the registry
        slugs, ``sim`` on pipelines of its own (``sim-<slug>``), so no pipeline gets two detectors. Names and
        keys only (no label files needed): the store counts them as registered with their category maps."""
        from antenna_flows.registration import declared_pipelines

        for kind in self.register_kinds:
            configs = [c.model_dump(mode="json") for c in declared_pipelines(kind, category_maps=False)]  # type: ignore[arg-type]
            for project_id in self.register_projects:
                self.store.register(project_id, PREREGISTERED_SERVICE.format(kind=kind), configs,
                                    category_maps_assumed=True)

    def _start_nats(self) -> None:
        if self._external_nats:
            return
        store_dir = self.queue_settings.nats_store_dir or self.data_dir / "nats"
        self.nats = EmbeddedNats(store_dir=store_dir, port=self._nats_port).start()

    def _start_api(self) -> None:
        app = create_app(
            self.store,
            self.nats_url,
            token=self.token,
            queue_config=self.queue_config,
            max_body_bytes=self.api_settings.api_max_body_bytes,
            housekeeping_interval_s=self._housekeeping_interval_s,
            save_workers=self.save_workers,
            reap_dead_letters=self.reap_dead_letters,
            seed=self.seed,
            costs=self.costs,
            heartbeat_throttle_s=self.heartbeat_throttle_s,
            online_window_s=self.online_window_s,
        )
        self._app_state = app.state.antenna
        # proto=IPPROTO_TCP, or asyncio does not set TCP_NODELAY on accepted connections
        # and every response waits ~40 ms on Nagle + delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.api_settings.api_host, self.api_settings.api_port))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2, lifespan="on")
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), name="antenna-api", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"the API did not start on port {self._port} (is NATS at {self.nats_url} reachable?)")
            time.sleep(0.005)

    def stop(self) -> None:
        """Stop the API, then NATS; an ephemeral stack's files go too. Safe to call twice."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    def __enter__(self) -> "DevStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults -----------------------------------------------------------------------------

    def _embedded(self) -> EmbeddedNats:
        if self.nats is None:
            raise RuntimeError("only an embedded NATS can be stopped or restarted by the stack")
        return self.nats

    def restart_nats(self, down_s: float = 0.0, wait: bool = True) -> None:
        """Stop NATS, stay down ``down_s`` seconds, start it again on the same port and store."""
        log.warning("fault: restarting NATS (down %.1fs)", down_s)
        self._embedded().restart(down_s)
        if wait:
            self.wait_api_connected()

    def stop_nats(self) -> None:
        self._embedded().stop()

    def start_nats(self, wait: bool = True) -> None:
        self._embedded().start()
        if wait:
            self.wait_api_connected()

    def wait_api_connected(self, timeout: float = 10.0) -> None:
        """Block until the API's NATS connection is back (it reconnects every 0.25 s)."""
        deadline = time.monotonic() + timeout
        while not self.antenna.plane.nats_connected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not reconnect to NATS within {timeout}s")
            time.sleep(0.02)

    def fail_api(self, seconds: float) -> None:
        """Every ``/api/v2`` endpoint answers 503 for ``seconds``."""
        self.antenna.fail_api(seconds)

    def fail_saves(self, seconds: float, fraction: float = 1.0) -> None:
        """For ``seconds``, ``fraction`` of background result saves fail (seeded): not stored, not acked,
        so NATS redelivers the task after ack_wait (the bench's ``save_errors``)."""
        self.antenna.fail_saves(seconds, fraction)

    def slow_saves(self, seconds: float, delay_s: float) -> None:
        """For ``seconds``, background saves, and so their acks, lag by ``delay_s`` (a backlogged Celery)."""
        self.antenna.slow_saves(seconds, delay_s)

    def slow_api(self, seconds: float, delay_s: float) -> None:
        """For ``seconds``, every ``/api/v2`` answer is delayed by ``delay_s``."""
        self.antenna.slow_api(seconds, delay_s)

    # --- observations ----------------------------------------------------------------------

    def request_counts(self) -> dict[str, int]:
        """The workers' requests so far: ``{"jobs", "tasks", "result", "other"}`` (admin requests excluded)."""
        return self.antenna.request_counts()

    def reset_request_counts(self) -> None:
        self.antenna.reset_request_counts()

    def dead_lettered(self, job_id: int) -> int:
        """Images of the job answered only by the dead-letter reaper (``reap_dead_letters``)."""
        return self.store.dead_lettered(job_id)

    def wait_saved(self, timeout: float = 10.0) -> None:
        """Block until every result the API accepted has been saved (or its save failed)."""
        deadline = time.monotonic() + timeout
        while self.antenna.plane.saves_pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.antenna.plane.saves_pending} result saves pending after {timeout}s")
            time.sleep(0.005)

    # --- jobs ---------------------------------------------------------------------------------

    def create_job(self, pipeline: str, images: int | Sequence[str] | Sequence[dict[str, Any]] = 10, **options: Any) -> Job:
        """Create a job over HTTP (see :meth:`AntennaAdmin.create_job`)."""
        return self.admin.create_job(pipeline, images, **options)
