"""The benchmark: a scenario (shared/bench format) run end to end on the real stack.

Real nats-server, the local Antenna-compatible API, and N worker processes
started with the real ``antenna-flows worker`` command (each a run of the
worker flow under Prefect, or the same code plain), jobs submitted at their
times, faults injected at theirs. The report (``--json``) follows
``shared/bench/README.md``; figures come from the API's records (results, first
result times, duplicates), the NATS consumers (cumulative redeliveries, read
before the streams are deleted) and the workers' per-batch metrics lines
(slot seconds, reservation idle times). Beside those the bench samples each
worker's resident memory and open files (``/proc``), counts the requests the
workers made to the API by endpoint, and reads what a Prefect run left in the
Prefect server's SQLite database.

Fairness to the baseline (``drain``): it decodes images by the model's fast
path as ``fair`` does, and each drain worker is at a random point of its idle
sleep at time zero (seeded by the scenario's ``seed``, reported as
``drain_start_phase_s``), as a real fleet is when a job arrives.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import socketserver
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from antenna_lab.antenna.costs import AntennaCosts
from antenna_lab.antenna.demo_images import demo_image_urls
from antenna_lab.antenna.admin import AntennaAdmin, AntennaError
from antenna_lab.antenna.devstack import DevStack
from antenna_lab.antenna.natsserver import free_port
from antenna_lab.settings import ApiSettings, QueueSettings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.2  # the bench shares the CPU with what it measures: poll gently


# --- scenario format -------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="ignore")


class QueueSpec(_Spec):
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 1000


class ModelSpec(_Spec):
    kind: Literal["sim", "ami"] = "sim"
    seconds_per_image: float = 0.05
    seconds_per_batch: float = 0.02
    max_batch_size: int | None = Field(None, ge=1)  # fair workers' largest GPU batch (default: drain.batch_size)


class ImagesSpec(_Spec):
    width: int = 640
    height: int = 480


class DrainSpec(_Spec):
    batch_size: int = 8
    loaders: int = 4
    prefetch: int = 4


class BadImages(_Spec):
    missing: int = 0  # 404
    corrupt: int = 0  # a JPEG header over pixels that never decode
    hanging: int = 0  # an image server that holds the request ``hang_s`` seconds, then answers garbage
    hang_s: float = 10.0

    @property
    def total(self) -> int:
        return self.missing + self.corrupt + self.hanging


class JobSpec(_Spec):
    id: int
    images: int = Field(ge=0)
    pipeline: str = "panama_moths_2024"
    submit_at_s: float = 0.0
    priority: int = 0
    bad_images: BadImages = Field(default_factory=BadImages)


FaultAction = Literal["kill_worker", "restart_nats", "api_errors", "cancel_job", "slow_api", "save_errors",
                      "slow_saves", "prefect_down"]


class FaultSpec(_Spec):
    at_s: float
    action: FaultAction
    worker: int = 0
    seconds: float = 5.0
    job: int | None = None
    restart_after_s: float | None = None  # kill_worker: start the same worker again after this long
    delay_s: float = 2.0  # slow_api, slow_saves
    fraction: float = 0.1  # save_errors

    @property
    def window_s(self) -> float:
        """How long the fault itself lasts (0 for an instant one; a killed worker: until restarted)."""
        if self.action in ("api_errors", "slow_api", "save_errors", "slow_saves", "prefect_down"):
            return self.seconds
        if self.action == "kill_worker":
            return self.restart_after_s or 0.0
        return 0.0


class Scenario(_Spec):
    name: str = "scenario"
    workers: int = Field(1, ge=1)
    queue: QueueSpec = Field(default_factory=QueueSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    images: ImagesSpec = Field(default_factory=ImagesSpec)
    drain: DrainSpec = Field(default_factory=DrainSpec)
    jobs: list[JobSpec] = Field(default_factory=list)
    faults: list[FaultSpec] = Field(default_factory=list)
    time_limit_s: float = 300.0
    transport: Literal["nats", "rest"] = "nats"  # how fair workers reach tasks; drain always uses REST
    seed: int = 0  # drain workers' start phases
    # Rollover: each worker ends its run after this many seconds (AMI_MAX_RUNTIME_S) and is started
    # again at once, as the worker deployment's next run is; handovers are reported with their idle gap.
    rollover_s: float | None = Field(None, gt=0)
    # What Antenna charges per request and per save (shared/bench/README.md); None: nothing, as before.
    antenna: AntennaCosts | None = None

    def drain_phases(self, sleep_s: float) -> list[float]:
        """Where each drain worker is in its idle sleep at time zero: uniform in [0, sleep), seeded."""
        rng = random.Random(f"{self.name}:{self.seed}")
        return [round(rng.uniform(0.0, sleep_s), 3) for _ in range(self.workers)]

    def ideal_makespan_model_s(self) -> float | None:
        """The bound from the scenario alone (``sim``): every image that must be inferred (not the
        broken ones, none of a job the scenario cancels) at ``seconds_per_image``, plus
        ``seconds_per_batch`` for the fewest full batches of ``drain.batch_size`` per pipeline
        (a batch holds one pipeline), over the workers. No duplicate work is in it."""
        if self.model.kind != "sim":
            return None
        cancelled = {f.job for f in self.faults if f.action == "cancel_job"}
        per_pipeline: dict[str, int] = {}
        for job in self.jobs:
            if job.id in cancelled:
                continue
            good = max(0, job.images - job.bad_images.total)
            per_pipeline[job.pipeline] = per_pipeline.get(job.pipeline, 0) + good
        images = sum(per_pipeline.values())
        batches = sum(math.ceil(n / self.drain.batch_size) for n in per_pipeline.values())
        m = self.model
        return (images * m.seconds_per_image + batches * m.seconds_per_batch) / self.workers

    @classmethod
    def load(cls, path: str | Path) -> "Scenario":
        return cls.model_validate_json(Path(path).read_text())


# --- running -----------------------------------------------------------------------


@dataclass
class BenchOptions:
    strategy: Literal["fair", "drain"] = "fair"
    orchestration: Literal["prefect", "plain"] = "prefect"
    out_dir: Path | None = None  # worker logs and metrics (default: a temp dir, removed)
    prefect_api_url: str | None = None  # default: $PREFECT_API_URL, else a server the bench starts
    worker_env: dict[str, str] = field(default_factory=dict)  # extra AMI_* settings for the workers
    keep_prefect_server: bool = False
    transport: Literal["nats", "rest"] | None = None  # overrides the scenario's (fair workers only)
    prefect_server: "PrefectServer | None" = None  # a server of the caller's (compare): stats and prefect_down work


# The bench's own Prefect server shares the CPU with what it measures (in production it runs
# elsewhere): only the services that record flow and task runs, events and logs run.
LEAN_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CLEANUP_RECONCILER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_LOGGER_ENABLED": "false",
}


class PrefectServer:
    """A ``prefect server start`` of our own on a free port, with a throwaway home."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 120.0) -> "PrefectServer":
        env = {**os.environ, **LEAN_SERVER_ENV, "PREFECT_HOME": str(self.home),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": self.api_url}
        prefect = Path(sys.executable).parent / "prefect"
        log_file = open(self.home / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: see {self.home / 'server.log'}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=1).status_code == 200:
                    log.info("Prefect server ready at %s", self.api_url)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"prefect server not ready within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    @property
    def db_path(self) -> Path:
        """Prefect's default database: ``$PREFECT_HOME/prefect.db`` (SQLite)."""
        return self.home / "prefect.db"

    def outage(self, seconds: float) -> None:
        """Down for ``seconds``, then up again on the same port and database (blocking)."""
        log.warning("fault: Prefect server down for %.1fs", seconds)
        down_at = time.monotonic()
        self.stop()
        time.sleep(max(0.0, seconds - (time.monotonic() - down_at)))
        self.start()


PREFECT_TABLES = {"flow_runs": "flow_run", "task_runs": "task_run", "events": "events", "logs": "log",
                  "artifacts": "artifact"}


def prefect_db_stats(db_path: Path) -> dict[str, int] | None:
    """Rows per table of interest and the database's size in bytes, after folding the WAL into
    the main file (``PRAGMA wal_checkpoint(TRUNCATE)``, so the size is the data's, not the log's)."""
    if not db_path.exists():
        return None
    db = sqlite3.connect(str(db_path), timeout=10)
    try:
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError as exc:  # busy: the size then includes some WAL
            log.warning("bench: Prefect database checkpoint failed: %s", exc)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        out = {key: (db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] if table in tables else 0)
               for key, table in PREFECT_TABLES.items()}
    finally:
        db.close()
    wal = db_path.with_name(db_path.name + "-wal")
    out["db_bytes"] = db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    return out


class HangingImageServer:
    """An image host that hangs: each request is held ``hang_s`` seconds (from its URL), then
    answered 200 with bytes that are no image. A worker must neither lose the task nor let its
    reservation lapse while the download hangs; the image ends as an error result (the download
    times out, or the bytes do not decode)."""

    BODY = b"<html>this is not an image</html>"

    def __init__(self) -> None:
        self._stop = threading.Event()
        stop = self._stop
        body = self.BODY

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(2.0)
                try:
                    head = self.request.recv(65536).decode("latin-1")
                    path = head.split(" ", 2)[1]  # /hang/<seconds>/<name>.jpg
                    hang_s = float(path.split("/")[2])
                except (OSError, IndexError, ValueError):
                    hang_s = 0.0
                stop.wait(hang_s)
                try:
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="hanging-images", daemon=True)

    def start(self) -> "HangingImageServer":
        self._thread.start()
        return self

    def url(self, hang_s: float, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hang/{hang_s:g}/{name}.jpg"

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


@functools.lru_cache(maxsize=1)
def _sim_slugs() -> frozenset[str]:
    from antenna_flows.registration import declared_pipelines

    return frozenset(p.slug for p in declared_pipelines("sim", category_maps=False))


def job_pipeline(slug: str, model_kind: str) -> str:
    """The slug a job for ``model_kind`` workers is submitted on: ``sim`` serves pipelines of its own,
    ``sim-<slug>`` (what ``declared_pipelines("sim")`` names; a scenario names the registry slug), so
    its answers never land on a real pipeline. A product whose sim still declares the registry slugs
    gets the slug as it is."""
    if model_kind != "sim":
        return slug
    sim = _sim_slugs()
    if slug in sim:
        return slug
    return f"sim-{slug}" if f"sim-{slug}" in sim else slug


def job_image_urls(base_url: str, spec: "JobSpec", width: int, height: int,
                   hanging: HangingImageServer | None) -> list[str]:
    """The job's image URLs on the local API, its broken ones spread evenly (hanging ones among the good)."""
    bad = spec.bad_images
    urls = demo_image_urls(base_url, spec.images, width, height, missing=bad.missing, corrupt=bad.corrupt,
                           prefix=f"job{spec.id}")
    if bad.hanging and hanging is not None:
        good = [i for i, u in enumerate(urls) if "/images/demo/" in u]
        if bad.hanging > len(good):
            raise ValueError(f"job {spec.id}: cannot make {bad.hanging} of {len(good)} good images hang")
        step = len(good) / bad.hanging
        for k in range(bad.hanging):
            i = good[int(k * step + step / 2)]
            urls[i] = hanging.url(bad.hang_s, f"job{spec.id}-{i:06d}")
    return urls


# --- what the bench watches in the worker processes --------------------------------------------


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                out.extend(kids)
                todo.extend(kids)
        except (OSError, ValueError):
            continue
    return out


def rss_mb(pid: int) -> float | None:
    """VmRSS of the process and its children, in MiB (None when it is gone)."""
    total, seen = 0, False
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        seen = True
                        break
        except OSError:
            continue
    return round(total / 1024, 1) if seen else None


def open_fds(pid: int) -> int | None:
    """Open file descriptors of the process and its children (None when it is gone)."""
    total, seen = 0, False
    for p in [pid, *_descendants(pid)]:
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
            seen = True
        except OSError:
            continue
    return total if seen else None


class ProcessSampler:
    """Every ``period_s`` from time zero: each worker's resident memory (first, peak, last)."""

    def __init__(self, workers: list[subprocess.Popen[bytes]], period_s: float = 1.0):
        self.workers = workers  # the bench's list: a restarted worker's new process is seen at once
        self.period_s = period_s
        self.rss: list[dict[str, Any]] = [{"worker": i, "first": None, "peak": None, "last": None, "samples": 0}
                                          for i in range(len(workers))]
        self.fds_start = [open_fds(p.pid) for p in workers]
        self.fds: list[list[int]] = [[] for _ in workers]  # every sample: growth shows as a rising series
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def start(self) -> "ProcessSampler":
        self._sample()
        self._thread.start()
        return self

    def _sample(self) -> None:
        for i, proc in enumerate(self.workers):
            mb = rss_mb(proc.pid) if proc.poll() is None else None
            if mb is None:
                continue
            row = self.rss[i]
            row["first"] = mb if row["first"] is None else row["first"]
            row["peak"] = mb if row["peak"] is None else max(row["peak"], mb)
            row["last"] = mb
            row["samples"] += 1
            fds = open_fds(proc.pid)
            if fds is not None:
                self.fds[i].append(fds)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        self._sample()
        fds_end = [open_fds(p.pid) if p.poll() is None else None for p in self.workers]
        return {
            "worker_rss_mb": self.rss,
            # start: at time zero; half: the mean over the run's first half of samples (after warm-up
            # connections open), end: the last. A leak shows as end well above half.
            "worker_open_fds": [{"worker": i, "start": a, "end": b, "peak": max(self.fds[i], default=None),
                                 "first_half_mean": _r(sum(h := self.fds[i][: max(1, len(self.fds[i]) // 2)]) / len(h), 1)
                                 if self.fds[i] else None}
                                for i, (a, b) in enumerate(zip(self.fds_start, fds_end))],
        }


class Bench:
    def __init__(self, scenario: Scenario, options: BenchOptions):
        self.scenario = scenario
        self.options = options
        self.workers: list[subprocess.Popen[bytes]] = []
        self._envs: list[dict[str, str]] = []
        self._out_dir: Path | None = None
        self._server: PrefectServer | None = None
        self._fault_threads: list[threading.Thread] = []
        self._fault_log: list[dict[str, Any]] = []
        self._phases: list[float] | None = None
        self._unacked: list[tuple[float, int]] = []  # (seconds from time zero, tasks delivered and not acked)
        self._max_redelivered: dict[int, int] = {}  # per job, the most NATS num_redelivered seen (as the harness)
        self._hanging: HangingImageServer | None = None

    @property
    def transport(self) -> str:
        if self.options.strategy == "drain":
            return "rest"
        return self.options.transport or self.scenario.transport

    def run(self) -> dict[str, Any]:
        sc, opt = self.scenario, self.options
        bench_start = time.monotonic()
        with ExitStack() as stack:
            out_dir = opt.out_dir or Path(tempfile.mkdtemp(prefix="antenna-bench-"))
            if opt.out_dir is None:
                stack.callback(shutil.rmtree, out_dir, True)
            out_dir.mkdir(parents=True, exist_ok=True)
            self._out_dir = out_dir
            queue = QueueSettings(
                nats_task_ttr=sc.queue.ack_wait_s, nats_max_deliver=sc.queue.max_deliver,
                nats_max_ack_pending=sc.queue.max_ack_pending, nats_store_dir=out_dir / "nats",
            )
            api = ApiSettings(api_port=0, data_dir=out_dir / "api")
            # The dead-letter reaper on: a task that ran out of max_deliver gets an error result marked
            # dead_lettered (reported apart), so its job ends instead of waiting out the time limit.
            dev = DevStack(queue, api, reap_dead_letters=True, seed=sc.seed, costs=sc.antenna)
            dev.start()
            stack.callback(dev.stop)
            admin = AntennaAdmin(dev.api_url, dev.token)
            stack.callback(admin.close)
            if any(j.bad_images.hanging for j in sc.jobs):
                self._hanging = HangingImageServer().start()
                stack.callback(self._hanging.stop)
            prefect_url = None
            if opt.orchestration == "prefect":
                self._server = opt.prefect_server
                prefect_url = self._server.api_url if self._server else (
                    opt.prefect_api_url or os.environ.get("PREFECT_API_URL"))
                if not prefect_url:
                    (out_dir / "prefect").mkdir(exist_ok=True)
                    self._server = PrefectServer(out_dir / "prefect").start()
                    if not opt.keep_prefect_server:
                        stack.callback(self._server.stop)
                    prefect_url = self._server.api_url
            prefect_before = prefect_db_stats(self._server.db_path) if self._server else None
            if sc.model.kind == "ami" and "AMI_WEIGHTS_DIR" not in opt.worker_env:
                weights = weights_for({j.pipeline for j in sc.jobs}, out_dir)
                opt.worker_env["AMI_WEIGHTS_DIR"] = str(weights)
            if sc.model.kind == "ami":  # load (and warm up) only what the scenario runs
                opt.worker_env.setdefault("AMI_PIPELINES", ",".join(sorted({j.pipeline for j in sc.jobs})))
            self._start_workers(dev, out_dir, prefect_url)
            stack.callback(self._stop_workers)
            self._wait_ready(out_dir)
            startup_s = time.monotonic() - bench_start
            log.info("bench %s: %d %s workers ready after %.1fs (%s, %s transport)", sc.name, sc.workers, opt.strategy,
                     startup_s, opt.orchestration, self.transport)
            requests_before = _request_counts(dev)
            if dev.antenna.web is not None:
                dev.antenna.web.reset_stats()
            dev.antenna.plane.reset_save_stats()
            t0 = time.time()
            self._release_drain(t0)
            sampler = ProcessSampler(self.workers).start()
            try:
                submitted, cancelled = self._drive(dev, admin, t0)
            finally:
                procs = sampler.stop()
            finished_at = time.time()
            requests_after = _request_counts(dev)
            try:
                dev.wait_saved(5.0)  # results the API accepted are in the store before it is read
            except Exception as exc:  # noqa: BLE001
                log.warning("bench: background saves still pending: %s", exc)
            jobs = {j.id: j.model_dump() for j in _retrying(admin.jobs)}
            answers = self._answers(dev, t0)
            saves = self._saves(dev, t0)
            for thread in self._fault_threads:  # a Prefect outage still under way ends before the workers stop
                thread.join()
            self._stop_workers()  # before reading Prefect's database: the runs' final states and logs are in
            prefect_after = prefect_db_stats(self._server.db_path) if self._server else None
            report = self._report(t0, startup_s, submitted, cancelled, jobs, out_dir, answers, saves)
            report["wall_s"] = round(finished_at - t0, 3)
            report["api_requests"] = _delta(requests_before, requests_after)
            report["antenna"] = self._antenna_figures(dev, report)
            report.update(procs)
            report["prefect"] = _delta(prefect_before, prefect_after) if opt.orchestration == "prefect" else None
            return report

    def _start_workers(self, dev: DevStack, out_dir: Path, prefect_url: str | None) -> None:
        sc, opt = self.scenario, self.options
        for i in range(sc.workers):
            name = self._name(i)
            env = {
                **os.environ,
                "AMI_ANTENNA_API_URL": dev.api_url,
                "AMI_ANTENNA_API_TOKEN": dev.token,
                "AMI_NATS_URL": dev.nats_url,
                "AMI_WORKER_NAME": name,
                "AMI_MODEL_KIND": sc.model.kind,
                "AMI_SIM_SECONDS_PER_IMAGE": str(sc.model.seconds_per_image),
                "AMI_SIM_SECONDS_PER_BATCH": str(sc.model.seconds_per_batch),
                "AMI_MAX_BATCH_SIZE": str(sc.model.max_batch_size or sc.drain.batch_size),
                "AMI_DRAIN_BATCH_SIZE": str(sc.drain.batch_size),
                "AMI_DRAIN_LOADERS": str(sc.drain.loaders),
                "AMI_DRAIN_PREFETCH": str(sc.drain.prefetch),
                "AMI_METRICS_FILE": str(out_dir / f"{name}.metrics.jsonl"),
                "AMI_READY_FILE": str(out_dir / f"{name}.ready"),
                "PYTHONUNBUFFERED": "1",
            }
            if opt.strategy == "drain":
                env["AMI_DRAIN_START_FILE"] = str(out_dir / f"{name}.start")
            elif self.transport == "rest":
                env["AMI_TRANSPORT"] = "rest"
                env["AMI_REST_ACK_WAIT_S"] = str(sc.queue.ack_wait_s)
            if sc.rollover_s:
                env["AMI_MAX_RUNTIME_S"] = str(sc.rollover_s)
            env.update(opt.worker_env)
            if prefect_url:
                env["PREFECT_API_URL"] = prefect_url
            self._envs.append(env)
            self.workers.append(self._spawn(i))

    def _name(self, i: int) -> str:
        return f"{self.options.strategy}-w{i}"

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        assert self._out_dir is not None
        cmd = [sys.executable, "-m", "antenna_flows.cli", "worker", "--strategy", self.options.strategy,
               "--orchestration", self.options.orchestration]
        log_file = open(self._out_dir / f"{self._name(i)}.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            return subprocess.Popen(cmd, env=self._envs[i], stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log_file.close()

    def _release_drain(self, t0: float) -> None:
        """Time zero for drain workers: each makes its first poll after the rest of the sleep it was in."""
        if self.options.strategy != "drain":
            return
        assert self._out_dir is not None
        sleep_s = float(self.options.worker_env.get("AMI_DRAIN_IDLE_SLEEP_S",
                                                    os.environ.get("AMI_DRAIN_IDLE_SLEEP_S", DEFAULT_DRAIN_SLEEP_S)))
        self._phases = self.scenario.drain_phases(sleep_s)
        for i, phase in enumerate(self._phases):
            path = self._out_dir / f"{self._name(i)}.start"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"t0": t0, "phase_s": phase, "sleep_s": sleep_s}))
            tmp.rename(path)

    def _wait_ready(self, out_dir: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        names = [self._name(i) for i in range(self.scenario.workers)]
        while time.monotonic() < deadline:
            for i, proc in enumerate(self.workers):
                if proc.poll() is not None:
                    tail = (out_dir / f"{names[i]}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"worker {names[i]} exited with {proc.returncode} before it was ready:\n{tail}")
            if all((out_dir / f"{n}.ready").exists() for n in names):
                return
            time.sleep(0.1)
        raise RuntimeError(f"workers not ready within {READY_TIMEOUT_S}s (logs in {out_dir})")

    def _drive(self, dev: DevStack, admin: AntennaAdmin, t0: float) -> tuple[dict[int, float], set[int]]:
        """Submit jobs and inject faults at their times; wait for every live job to finish."""
        sc = self.scenario
        events: list[tuple[float, int, Any]] = [(j.submit_at_s, 0, j) for j in sc.jobs]
        events += [(f.at_s, 1, f) for f in sc.faults]
        events.sort(key=lambda e: (e[0], e[1]))
        submitted: dict[int, float] = {}
        cancelled: set[int] = set()
        deadline = t0 + sc.time_limit_s
        base = dev.base_url
        while time.time() < deadline:
            now = time.time() - t0
            while events and events[0][0] <= now:
                _, kind, spec = events.pop(0)
                if kind == 0:
                    urls = job_image_urls(base, spec, sc.images.width, sc.images.height, self._hanging)
                    submitted[spec.id] = time.time() - t0
                    self._submit(admin, spec, urls)
                elif kind == 1:
                    follow = self._fault(spec, dev, admin, cancelled, t0)
                    if follow is not None:
                        events.append(follow)
                        events.sort(key=lambda e: (e[0], e[1]))
                else:
                    self._restart_worker(spec, t0)
            if sc.rollover_s:
                self._roll_over(t0)
            if submitted and self._observe(admin, set(submitted) - cancelled, t0) and not events:
                break
            time.sleep(POLL_S)
        return submitted, cancelled

    def _submit(self, admin: AntennaAdmin, spec: JobSpec, urls: list[str]) -> None:
        """Create the job, through an injected outage or a slow API (the bench does not give up)."""
        sc = self.scenario

        def create() -> None:
            try:
                admin.create_job(pipeline=job_pipeline(spec.pipeline, sc.model.kind), image_urls=urls, priority=spec.priority, job_id=spec.id,
                                 name=f"{sc.name} job {spec.id}")
            except AntennaError as exc:
                # an earlier try that timed out may have created it: then it is there, and that is success
                if exc.status < 500 and _job_exists(admin, spec.id):
                    return
                raise

        _retrying(create, attempts=300)

    def _observe(self, admin: AntennaAdmin, live: set[int], t0: float) -> bool:
        """Whether every live job is done; on the way, the tasks delivered and not yet acked (NATS's
        ``num_ack_pending``, summed over jobs) for the Little's-law cross-check of reservation times."""
        try:
            jobs = {j.id: j for j in admin.jobs()}
        except (AntennaError, httpx.HTTPError):  # an injected API outage: look again at the next poll
            return False
        self._unacked.append((time.time() - t0, sum(j.ack_pending for j in jobs.values() if j.id in live and not j.final)))
        for j in jobs.values():
            if j.id in live:
                self._max_redelivered[j.id] = max(self._max_redelivered.get(j.id, 0), j.redelivered)
        return all(jid in jobs and jobs[jid].processed >= jobs[jid].total for jid in live)

    def _fault(self, fault: FaultSpec, dev: DevStack, admin: AntennaAdmin, cancelled: set[int],
               t0: float) -> tuple[float, int, Any] | None:
        """Inject one fault; returns a follow-up event (a worker's restart) when there is one."""
        log.warning("bench: fault %s", fault.model_dump(exclude_defaults=True))
        entry: dict[str, Any] = {**fault.model_dump(exclude_defaults=True), "applied_s": _r(time.time() - t0)}
        self._fault_log.append(entry)
        follow = None
        try:
            if fault.action == "kill_worker":
                i = fault.worker % len(self.workers)
                proc = self.workers[i]
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                if fault.restart_after_s is not None:
                    follow = (fault.at_s + fault.restart_after_s, 2, i)
            elif fault.action == "restart_nats":
                dev.restart_nats()
            elif fault.action == "api_errors":
                dev.fail_api(fault.seconds)
            elif fault.action == "slow_api":
                _devstack_call(dev, "slow_api", fault.seconds, fault.delay_s)
            elif fault.action == "save_errors":
                _devstack_call(dev, "fail_saves", fault.seconds, fault.fraction)
            elif fault.action == "slow_saves":
                _devstack_call(dev, "slow_saves", fault.seconds, fault.delay_s)
            elif fault.action == "prefect_down":
                if self._server is None:
                    raise RuntimeError("prefect_down needs --orchestration prefect and a Prefect server the bench "
                                       "started (not one from PREFECT_API_URL)")
                thread = threading.Thread(target=self._server.outage, args=(fault.seconds,), name="prefect-outage",
                                          daemon=True)
                thread.start()
                self._fault_threads.append(thread)
            elif fault.action == "cancel_job" and fault.job is not None:
                _retrying(lambda: admin.cancel(fault.job), attempts=300)  # type: ignore[arg-type]
                cancelled.add(fault.job)
        except Exception as exc:  # noqa: BLE001 - a fault that cannot be injected is reported, not fatal
            log.error("bench: fault %s could not be injected: %s", fault.action, exc)
            entry["error"] = str(exc)
        return follow

    def _restart_worker(self, i: int, t0: float) -> None:
        """The same worker (same name, settings, files) started again, as a supervisor would."""
        log.warning("bench: restarting worker %s", self._name(i))
        if self.workers[i].poll() is None:
            return
        self.workers[i] = self._spawn(i)
        self._fault_log.append({"action": "restart_worker", "worker": i, "applied_s": _r(time.time() - t0)})

    def _roll_over(self, t0: float) -> None:
        """A worker whose run ended by itself (exit 0 at max_runtime_s) is started again at once."""
        for i, proc in enumerate(self.workers):
            if proc.poll() == 0:
                exited = time.time() - t0
                log.warning("bench: worker %s ended its run (rollover); starting the next", self._name(i))
                self.workers[i] = self._spawn(i)
                self._fault_log.append({"action": "rollover", "worker": i, "applied_s": _r(exited)})

    def _stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.workers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def _answers(self, dev: DevStack, t0: float) -> dict[str, Any]:
        """Per-image first answers from the API's store: the timeline, and which were dead letters."""
        times: list[float] = []
        dead: dict[int, int] = {}
        for spec in self.scenario.jobs:
            try:
                records = dev.store.results(spec.id)
            except Exception as exc:  # noqa: BLE001 - figures from the job rows still stand
                log.warning("bench: results of job %s unreadable: %s", spec.id, exc)
                continue
            times.extend(r.first_at - t0 for r in records)
            dead[spec.id] = sum(1 for r in records if getattr(r, "dead_lettered", False))
        bins: list[int] = []
        for t in times:
            k = max(0, int(t))
            if k >= len(bins):
                bins.extend([0] * (k + 1 - len(bins)))
            bins[k] += 1
        return {"per_s": bins, "dead": dead}

    def _saves(self, dev: DevStack, t0: float) -> dict[int, dict[str, Any]]:
        """Per job, from the API's save queue: when each image's first answer was accepted (seconds from
        time zero) and how long each stored result waited from acceptance to its save."""
        plane = dev.antenna.plane
        out: dict[int, dict[str, Any]] = {}
        for spec in self.scenario.jobs:
            answered = plane.answered_at(spec.id)
            out[spec.id] = {"answered": sorted(t - t0 for t in answered.values()), "delays": plane.save_delays(spec.id)}
        return out

    def _antenna_figures(self, dev: DevStack, report: dict[str, Any]) -> dict[str, Any] | None:
        """What the cost model did (None without one): the model, the save queue's longest backlog, the
        acceptance-to-save delay overall and by job size (small jobs waiting behind big ones shows here),
        and the web workers' backlog and waits by endpoint."""
        sc = self.scenario
        if sc.antenna is None:
            return None
        antenna = dev.antenna
        by_size: dict[int, list[float]] = {}
        for row in report["jobs"]:
            by_size.setdefault(row["images"], []).extend(row.pop("_save_delays", []))
        every = [d for delays in by_size.values() for d in delays]
        return {
            "model": sc.antenna.model_dump(),
            "save_queue_peak": antenna.plane.save_queue_peak,
            "saves_done": antenna.plane.saves_done, "saves_failed": antenna.plane.saves_failed,
            "save_delay_s": _spread(every),
            "save_delay_by_job_images": {str(k): _spread(v) for k, v in sorted(by_size.items())},
            "web": antenna.web.stats() if antenna.web is not None else None,
            "cpu_busy_s": _r(antenna.web.cpu.busy_s) if antenna.web is not None else None,
        }

    def _handovers(self, out_dir: Path, t0: float) -> list[dict[str, Any]]:
        """Per rollover: the worker's slot idle gap around it (last batch of the old run to the first of
        the next), i.e. what a GPU loses at a handover."""
        out = []
        for entry in self._fault_log:
            if entry.get("action") != "rollover":
                continue
            name = self._name(entry["worker"])
            path = out_dir / f"{name}.metrics.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
            at = t0 + entry["applied_s"]
            before = [r["t_end"] for r in rows if r["t_end"] <= at]
            after = [r["t_start"] for r in rows if r["t_start"] >= at]
            gap = (min(after) - max(before)) if before and after else None
            out.append({"worker": entry["worker"], "exited_s": entry["applied_s"], "slot_idle_gap_s": _r(gap)})
        return out

    def _report(self, t0: float, startup_s: float, submitted: dict[int, float], cancelled: set[int],
                jobs: dict[int, dict[str, Any]], out_dir: Path, answers: dict[str, Any],
                saves: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
        sc, opt = self.scenario, self.options
        slot_s = 0.0
        inferred = 0
        max_idle = 0.0
        idles: list[float] = []
        for path in out_dir.glob("*.metrics.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                slot_s += row.get("slot_s", 0.0)
                inferred += int(row.get("n", 0))
                max_idle = max(max_idle, row.get("max_reserved_idle_s", 0.0))
                idles.append(row.get("max_reserved_idle_s", 0.0))
        handovers = self._handovers(out_dir, t0)
        rows = []
        answered_total = 0
        last_answer = 0.0
        last_save = 0.0
        lost = 0
        costs = sc.antenna is not None
        for spec in sc.jobs:
            j = jobs.get(spec.id, {})
            results, errors = int(j.get("results", 0)), int(j.get("errors", 0))
            dead = int(j["dead_lettered"]) if "dead_lettered" in j else answers["dead"].get(spec.id, 0)
            total = int(j.get("total", spec.images))
            answered_total += results + errors
            first = j.get("first_result_at")
            last = j.get("last_result_at") or j.get("completed_at")
            saved = last if results + errors >= total else None  # the store records a result when it is saved
            done = saved
            job_saves = (saves or {}).get(spec.id, {"answered": [], "delays": []})
            if costs:
                # Saves take time: the job is answered when its last image got its first answer accepted
                # (an image answered only by the dead-letter reaper: when the reaper stored it)
                answered = job_saves["answered"]
                if answered:
                    first = min(first or math.inf, answered[0] + t0)
                    last_answered = answered[-1] + t0
                    last_answer = max(last_answer, answered[-1])
                    if saved is not None:  # complete: answered when the last worker answer was accepted
                        done = last_answered if len(answered) >= total - dead else saved
                    else:  # answered whole, saves still behind (or lost)
                        done = last_answered if len(answered) >= total else None
                if last:
                    last_save = max(last_save, last - t0)
            elif last:
                last_answer = max(last_answer, last - t0)
            if spec.id not in cancelled:
                lost += max(0, total - results - errors)
            delays = job_saves["delays"]
            rows.append({
                "id": spec.id, "images": spec.images, "results": results, "errors": errors - dead,
                "dead_lettered": dead,
                "submitted_s": _r(submitted.get(spec.id)),
                "first_result_s": _r(first - t0 if first else None),
                "completed_s": _r(done - t0 if done else None),
                "saved_s": _r(saved - t0 if saved else None),
                "redelivered": int(j.get("redeliveries", 0)), "duplicates": int(j.get("duplicates", 0)),
                "max_redelivered": self._max_redelivered.get(spec.id, 0),
                "priority": spec.priority, "pipeline": job_pipeline(spec.pipeline, sc.model.kind),
                "cancelled": spec.id in cancelled,
                **({"save_delay_mean_s": _r(sum(delays) / len(delays)) if delays else None,
                    "save_delay_p95_s": _spread(delays)["p95"], "_save_delays": delays} if costs else {}),
            })
        makespan = last_answer
        saved_makespan = last_save if costs else last_answer
        # Each image's first inference only: drain re-infers what NATS redelivered, and that duplicate
        # work is no part of the bound. Slot seconds are scaled by (images answered by a worker /
        # images inferred), i.e. duplicates are charged at the run's mean slot seconds per image.
        worker_answered = answered_total - sum(r["dead_lettered"] for r in rows)
        first_share = min(1.0, worker_answered / inferred) if inferred else 1.0
        ideal_model = sc.ideal_makespan_model_s()
        # Little's law, from NATS's side alone (no worker's word for it): the mean time a task spends
        # delivered-but-unacked (reserved, loading, in inference, posting, saving) is the mean number
        # unacked over the busy period divided by the answer rate.
        busy = [n for t, n in self._unacked if t <= makespan]
        mean_unacked = sum(busy) / len(busy) if busy else 0.0
        rate = answered_total / makespan if makespan > 0 else 0.0
        return {
            "scenario": sc.name, "strategy": opt.strategy, "orchestration": opt.orchestration, "workers": sc.workers,
            "transport": self.transport,
            "startup_s": _r(startup_s), "makespan_s": _r(makespan), "saved_makespan_s": _r(saved_makespan),
            "images_per_s": _r(answered_total / makespan if makespan > 0 else 0.0),
            "ideal_makespan_s": _r(slot_s * first_share / sc.workers),
            "ideal_makespan_model_s": _r(ideal_model),
            "redeliveries": sum(r["redelivered"] for r in rows), "duplicate_results": sum(r["duplicates"] for r in rows),
            "lost": lost, "errors": sum(r["errors"] for r in rows),
            "dead_lettered": sum(r["dead_lettered"] for r in rows),
            "max_reserved_idle_s": _r(max_idle),
            # the max is one observation out of every batch: the 99th percentile of the per-batch maxima beside it
            "reserved_idle_p99_s": _r(sorted(idles)[min(len(idles) - 1, int(0.99 * len(idles)))] if idles else 0.0),
            "mean_unacked_tasks": _r(mean_unacked, 1), "max_unacked_tasks": max(busy, default=0),
            "mean_unacked_s": _r(mean_unacked / rate if rate else None),
            "slot_seconds": _r(slot_s), "inferred_images": inferred, "ack_wait_s": sc.queue.ack_wait_s,
            "time_limit_s": sc.time_limit_s,
            "drain_start_phase_s": self._phases, "seed": sc.seed,
            "faults": self._fault_log,
            "handovers": handovers,
            "answers_per_s": answers["per_s"],
            "jobs": rows,
        }


DEFAULT_DRAIN_SLEEP_S = 5.0  # DrainSettings.drain_idle_sleep_s (upstream SLEEP_TIME_SECONDS)


def _devstack_call(dev: DevStack, name: str, *args: Any) -> None:
    getattr(dev, name)(*args)


def _request_counts(dev: DevStack) -> dict[str, int] | None:
    """The workers' requests to the API by endpoint (the bench's own admin calls excluded), if counted."""
    counts = getattr(dev, "request_counts", None)
    if counts is None:
        return None
    try:
        got = counts()
    except Exception as exc:  # noqa: BLE001
        log.warning("bench: request counts unreadable: %s", exc)
        return None
    out = {"jobs": 0, "tasks": 0, "result": 0, "other": 0}
    for key, value in dict(got).items():
        out[key if key in out else "other"] += int(value)
    return out


def _delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if after is None:
        return None
    return {k: v - (before or {}).get(k, 0) for k, v in after.items()}


def _job_exists(admin: AntennaAdmin, job_id: int) -> bool:
    try:
        admin.job(job_id)
        return True
    except (AntennaError, httpx.HTTPError):
        return False


def weights_for(pipelines: set[str], out_dir: Path) -> Path:
    """Where ``ami`` workers find their weights: ``AMI_WEIGHTS_DIR`` when it holds every file
    these pipelines need, else random weights of the real architectures, written once under
    ``out_dir`` in the published formats (right for timings and schemas, not for labels)."""
    from antenna_flows.models.fakes import write_random_pipeline
    from antenna_flows.models.registry import get_pipeline
    from antenna_flows.settings import WorkerSettings

    specs = [get_pipeline(p) for p in sorted(pipelines)]
    configured = WorkerSettings().weights_dir
    needed = [f for spec in specs for stage in spec.stages
              for f in [stage.weights.filename, *([stage.labels.filename] if getattr(stage, "labels", None) else [])]]
    if all((configured / f).exists() for f in needed):
        return configured
    fake = out_dir / "random-weights"
    log.warning("bench: no real weights in %s; using random weights of the real architectures in %s "
                "(timings and schemas are real, labels are not)", configured, fake)
    for spec in specs:
        write_random_pipeline(spec, fake)
    return fake


def _retrying(call: Any, attempts: int = 50, pause_s: float = 0.2) -> Any:
    """Call the API through an injected outage or a slow API (the bench observes; it does not give up).
    5xx, timeouts and connection errors are retried; any other error status is raised at once."""
    for attempt in range(attempts):
        try:
            return call()
        except AntennaError as exc:
            if exc.status < 500 or attempt == attempts - 1:
                raise
        except httpx.HTTPError:
            if attempt == attempts - 1:
                raise
        time.sleep(pause_s)


def _spread(values: list[float]) -> dict[str, float | int | None]:
    """Count, mean, 95th percentile and max of ``values`` (seconds)."""
    if not values:
        return {"n": 0, "mean": None, "p95": None, "max": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"n": len(ordered), "mean": _r(sum(ordered) / len(ordered)), "p95": _r(p95), "max": _r(ordered[-1])}


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def run_bench(scenario: Scenario, options: BenchOptions) -> dict[str, Any]:
    return Bench(scenario, options).run()


def format_report(report: dict[str, Any]) -> str:
    """A terminal table: one row per job, then the run's figures."""
    head = f"{'job':>6} {'pipeline':<22} {'prio':>4} {'images':>6} {'results':>7} {'errors':>6} " \
           f"{'submit_s':>8} {'first_s':>8} {'done_s':>8} {'took_s':>7} {'saved_s':>8} {'redeliv':>7} {'dups':>5}"
    lines = [head, "-" * len(head)]
    for j in report["jobs"]:
        took = (j["completed_s"] - j["submitted_s"]) if j["completed_s"] is not None and j["submitted_s"] is not None else None
        lines.append(
            f"{j['id']:>6} {j['pipeline'][:22]:<22} {j['priority']:>4} {j['images']:>6} {j['results']:>7} {j['errors']:>6} "
            f"{_f(j['submitted_s'])} {_f(j['first_result_s'])} {_f(j['completed_s'])} {_f(took, 7)} "
            f"{_f(j.get('saved_s'))} {j['redelivered']:>7} {j['duplicates']:>5}"
            + ("  (cancelled)" if j.get("cancelled") else "")
        )
    lines.append("")
    lines.append(
        f"{report['scenario']}: strategy={report['strategy']} orchestration={report['orchestration']} "
        f"transport={report.get('transport')} workers={report['workers']} startup={report['startup_s']}s"
    )
    lines.append(
        f"makespan={report['makespan_s']}s (ideal {report['ideal_makespan_s']}s measured, "
        f"{report.get('ideal_makespan_model_s')}s from the scenario) images/s={report['images_per_s']} "
        f"redeliveries={report['redeliveries']} duplicates={report['duplicate_results']} lost={report['lost']} "
        f"errors={report['errors']} dead_lettered={report.get('dead_lettered', 0)} "
        f"max_reserved_idle={report['max_reserved_idle_s']}s (ack_wait {report['ack_wait_s']}s)"
    )
    lines.append(
        f"reservation idle: max {report['max_reserved_idle_s']}s, p99 of batches {report.get('reserved_idle_p99_s')}s "
        f"(workers' clocks); delivery to ack, mean {report.get('mean_unacked_s')}s over "
        f"{report.get('mean_unacked_tasks')} unacked tasks (NATS, Little's law)"
    )
    if report.get("drain_start_phase_s"):
        lines.append(f"drain start phases (s into the idle sleep at time zero): {report['drain_start_phase_s']}")
    if report.get("api_requests"):
        lines.append(f"API requests by the workers: {report['api_requests']}")
    if report.get("antenna"):
        a = report["antenna"]
        lines.append(f"Antenna costs: all saved at {report.get('saved_makespan_s')}s; save queue peak "
                     f"{a['save_queue_peak']}; acceptance to save {a['save_delay_s']}; web {a['web']}")
    if report.get("worker_rss_mb"):
        lines.append("worker RSS MiB (first/peak/last): " + ", ".join(
            f"w{r['worker']} {r['first']}/{r['peak']}/{r['last']}" for r in report["worker_rss_mb"]))
    if report.get("worker_open_fds"):
        lines.append("worker open fds (start -> first-half mean -> end, peak): " + ", ".join(
            f"w{r['worker']} {r['start']}->{r.get('first_half_mean')}->{r['end']} ({r.get('peak')})"
            for r in report["worker_open_fds"]))
    if report.get("prefect"):
        lines.append(f"Prefect database: {report['prefect']}")
    for fault in report.get("faults") or ():
        lines.append(f"fault at {fault.get('applied_s')}s: {fault}")
    return "\n".join(lines)


def _f(value: float | None, width: int = 8) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"
