"""The benchmark: a scenario (shared/bench format) run end to end on the real stack.

Real nats-server, the local Antenna-compatible API, and N worker processes
started with the real ``antenna-flows worker`` command (each a run of the
worker flow under Prefect, or the same code plain), jobs submitted at their
times, faults injected at theirs. The report (``--json``) follows
``shared/bench/README.md``; figures come from the API's records (results, first
result times, duplicates), the NATS consumers (cumulative redeliveries, read
before the streams are deleted) and the workers' per-batch metrics lines
(slot seconds, reservation idle times).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from antenna_flows.lab.antenna.demo_images import demo_image_urls
from antenna_flows.lab.antenna.admin import AntennaAdmin, AntennaError
from antenna_flows.lab.antenna.devstack import DevStack
from antenna_flows.lab.antenna.natsserver import free_port
from antenna_flows.settings import ApiSettings, QueueSettings

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


class ImagesSpec(_Spec):
    width: int = 640
    height: int = 480


class DrainSpec(_Spec):
    batch_size: int = 8
    loaders: int = 4
    prefetch: int = 4


class BadImages(_Spec):
    missing: int = 0
    corrupt: int = 0


class JobSpec(_Spec):
    id: int
    images: int = Field(ge=0)
    pipeline: str = "panama_moths_2024"
    submit_at_s: float = 0.0
    priority: int = 0
    bad_images: BadImages = Field(default_factory=BadImages)


class FaultSpec(_Spec):
    at_s: float
    action: Literal["kill_worker", "restart_nats", "api_errors", "cancel_job"]
    worker: int = 0
    seconds: float = 5.0
    job: int | None = None


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
        log_file = open(self.home / "server.log", "wb")  # noqa: SIM115
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


class Bench:
    def __init__(self, scenario: Scenario, options: BenchOptions):
        self.scenario = scenario
        self.options = options
        self.workers: list[subprocess.Popen[bytes]] = []

    def run(self) -> dict[str, Any]:
        sc, opt = self.scenario, self.options
        bench_start = time.monotonic()
        with ExitStack() as stack:
            out_dir = opt.out_dir or Path(tempfile.mkdtemp(prefix="antenna-bench-"))
            if opt.out_dir is None:
                stack.callback(shutil.rmtree, out_dir, True)
            out_dir.mkdir(parents=True, exist_ok=True)
            queue = QueueSettings(
                nats_task_ttr=sc.queue.ack_wait_s, nats_max_deliver=sc.queue.max_deliver,
                nats_max_ack_pending=sc.queue.max_ack_pending, nats_store_dir=out_dir / "nats",
            )
            api = ApiSettings(api_port=0, data_dir=out_dir / "api")
            dev = DevStack(queue, api)
            dev.start()
            stack.callback(dev.stop)
            admin = AntennaAdmin(dev.api_url, dev.token)
            stack.callback(admin.close)
            prefect_url = None
            if opt.orchestration == "prefect":
                prefect_url = opt.prefect_api_url or os.environ.get("PREFECT_API_URL")
                if not prefect_url:
                    (out_dir / "prefect").mkdir(exist_ok=True)
                    server = PrefectServer(out_dir / "prefect").start()
                    if not opt.keep_prefect_server:
                        stack.callback(server.stop)
                    prefect_url = server.api_url
            if sc.model.kind == "ami" and "AMI_WEIGHTS_DIR" not in opt.worker_env:
                weights = weights_for({j.pipeline for j in sc.jobs}, out_dir)
                opt.worker_env["AMI_WEIGHTS_DIR"] = str(weights)
            if sc.model.kind == "ami":  # load (and warm up) only what the scenario runs
                opt.worker_env.setdefault("AMI_PIPELINES", ",".join(sorted({j.pipeline for j in sc.jobs})))
            self._start_workers(dev, out_dir, prefect_url)
            stack.callback(self._stop_workers)
            self._wait_ready(out_dir)
            startup_s = time.monotonic() - bench_start
            log.info("bench %s: %d %s workers ready after %.1fs (%s)", sc.name, sc.workers, opt.strategy, startup_s,
                     opt.orchestration)
            t0 = time.time()
            submitted, cancelled = self._drive(dev, admin, t0)
            finished_at = time.time()
            jobs = {j.id: j.model_dump() for j in _retrying(admin.jobs)}
            report = self._report(t0, startup_s, submitted, cancelled, jobs, out_dir)
            report["wall_s"] = round(finished_at - t0, 3)
            return report

    def _start_workers(self, dev: DevStack, out_dir: Path, prefect_url: str | None) -> None:
        sc, opt = self.scenario, self.options
        for i in range(sc.workers):
            name = f"{opt.strategy}-w{i}"
            env = {
                **os.environ,
                "AMI_ANTENNA_API_URL": dev.api_url,
                "AMI_ANTENNA_API_TOKEN": dev.token,
                "AMI_NATS_URL": dev.nats_url,
                "AMI_WORKER_NAME": name,
                "AMI_MODEL_KIND": sc.model.kind,
                "AMI_SIM_SECONDS_PER_IMAGE": str(sc.model.seconds_per_image),
                "AMI_SIM_SECONDS_PER_BATCH": str(sc.model.seconds_per_batch),
                "AMI_MAX_BATCH_SIZE": str(sc.drain.batch_size),
                "AMI_DRAIN_BATCH_SIZE": str(sc.drain.batch_size),
                "AMI_DRAIN_LOADERS": str(sc.drain.loaders),
                "AMI_DRAIN_PREFETCH": str(sc.drain.prefetch),
                "AMI_METRICS_FILE": str(out_dir / f"{name}.metrics.jsonl"),
                "AMI_READY_FILE": str(out_dir / f"{name}.ready"),
                "PYTHONUNBUFFERED": "1",
                **opt.worker_env,
            }
            if prefect_url:
                env["PREFECT_API_URL"] = prefect_url
            cmd = [sys.executable, "-m", "antenna_flows.cli", "worker", "--strategy", opt.strategy,
                   "--orchestration", opt.orchestration]
            log_file = open(out_dir / f"{name}.log", "wb")  # noqa: SIM115
            self.workers.append(subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                                 start_new_session=True))

    def _wait_ready(self, out_dir: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        names = [f"{self.options.strategy}-w{i}" for i in range(self.scenario.workers)]
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
                    urls = demo_image_urls(base, spec.images, sc.images.width, sc.images.height,
                                           missing=spec.bad_images.missing, corrupt=spec.bad_images.corrupt,
                                           prefix=f"job{spec.id}")
                    submitted[spec.id] = time.time() - t0
                    admin.create_job(pipeline=spec.pipeline, image_urls=urls, priority=spec.priority, job_id=spec.id,
                                     name=f"{sc.name} job {spec.id}")
                else:
                    self._fault(spec, dev, admin, cancelled)
            if not events and submitted and self._all_done(admin, set(submitted) - cancelled):
                break
            time.sleep(POLL_S)
        return submitted, cancelled

    @staticmethod
    def _all_done(admin: AntennaAdmin, live: set[int]) -> bool:
        if not live:
            return True
        try:
            jobs = {j.id: j for j in admin.jobs()}
        except AntennaError:  # an injected API outage: look again at the next poll
            return False
        return all(jid in jobs and jobs[jid].processed >= jobs[jid].total for jid in live)

    def _fault(self, fault: FaultSpec, dev: DevStack, admin: AntennaAdmin, cancelled: set[int]) -> None:
        log.warning("bench: fault %s", fault.model_dump())
        if fault.action == "kill_worker":
            proc = self.workers[fault.worker % len(self.workers)]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        elif fault.action == "restart_nats":
            dev.restart_nats()
        elif fault.action == "api_errors":
            dev.fail_api(fault.seconds)
        elif fault.action == "cancel_job" and fault.job is not None:
            admin.cancel(fault.job)
            cancelled.add(fault.job)

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

    def _report(self, t0: float, startup_s: float, submitted: dict[int, float], cancelled: set[int],
                jobs: dict[int, dict[str, Any]], out_dir: Path) -> dict[str, Any]:
        sc, opt = self.scenario, self.options
        slot_s = 0.0
        max_idle = 0.0
        for path in out_dir.glob("*.metrics.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                slot_s += row.get("slot_s", 0.0)
                max_idle = max(max_idle, row.get("max_reserved_idle_s", 0.0))
        rows = []
        answered_total = 0
        last_answer = 0.0
        lost = 0
        for spec in sc.jobs:
            j = jobs.get(spec.id, {})
            results, errors = int(j.get("results", 0)), int(j.get("errors", 0))
            total = int(j.get("total", spec.images))
            answered_total += results + errors
            first = j.get("first_result_at")
            last = j.get("last_result_at") or j.get("completed_at")
            done = last if results + errors >= total else None
            if last:
                last_answer = max(last_answer, last - t0)
            if spec.id not in cancelled:
                lost += max(0, total - results - errors)
            rows.append({
                "id": spec.id, "images": spec.images, "results": results, "errors": errors,
                "submitted_s": _r(submitted.get(spec.id)),
                "first_result_s": _r(first - t0 if first else None),
                "completed_s": _r(done - t0 if done else None),
                "redelivered": int(j.get("redeliveries", 0)), "duplicates": int(j.get("duplicates", 0)),
                "priority": spec.priority, "pipeline": spec.pipeline, "cancelled": spec.id in cancelled,
            })
        makespan = last_answer
        return {
            "scenario": sc.name, "strategy": opt.strategy, "orchestration": opt.orchestration, "workers": sc.workers,
            "startup_s": _r(startup_s), "makespan_s": _r(makespan),
            "images_per_s": _r(answered_total / makespan if makespan > 0 else 0.0),
            "ideal_makespan_s": _r(slot_s / sc.workers),
            "redeliveries": sum(r["redelivered"] for r in rows), "duplicate_results": sum(r["duplicates"] for r in rows),
            "lost": lost, "errors": sum(r["errors"] for r in rows), "max_reserved_idle_s": _r(max_idle),
            "slot_seconds": _r(slot_s), "ack_wait_s": sc.queue.ack_wait_s,
            "jobs": rows,
        }


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


def _retrying(read: Any, attempts: int = 50, pause_s: float = 0.2) -> Any:
    """Read from the API through an injected outage (the bench observes; it does not give up)."""
    for attempt in range(attempts):
        try:
            return read()
        except AntennaError:
            if attempt == attempts - 1:
                raise
            time.sleep(pause_s)


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def run_bench(scenario: Scenario, options: BenchOptions) -> dict[str, Any]:
    return Bench(scenario, options).run()


def format_report(report: dict[str, Any]) -> str:
    """A terminal table: one row per job, then the run's figures."""
    head = f"{'job':>6} {'pipeline':<22} {'prio':>4} {'images':>6} {'results':>7} {'errors':>6} " \
           f"{'submit_s':>8} {'first_s':>8} {'done_s':>8} {'took_s':>7} {'redeliv':>7} {'dups':>5}"
    lines = [head, "-" * len(head)]
    for j in report["jobs"]:
        took = (j["completed_s"] - j["submitted_s"]) if j["completed_s"] is not None and j["submitted_s"] is not None else None
        lines.append(
            f"{j['id']:>6} {j['pipeline'][:22]:<22} {j['priority']:>4} {j['images']:>6} {j['results']:>7} {j['errors']:>6} "
            f"{_f(j['submitted_s'])} {_f(j['first_result_s'])} {_f(j['completed_s'])} {_f(took, 7)} "
            f"{j['redelivered']:>7} {j['duplicates']:>5}"
            + ("  (cancelled)" if j.get("cancelled") else "")
        )
    lines.append("")
    lines.append(
        f"{report['scenario']}: strategy={report['strategy']} orchestration={report['orchestration']} "
        f"workers={report['workers']} startup={report['startup_s']}s"
    )
    lines.append(
        f"makespan={report['makespan_s']}s (ideal {report['ideal_makespan_s']}s) images/s={report['images_per_s']} "
        f"redeliveries={report['redeliveries']} duplicates={report['duplicate_results']} lost={report['lost']} "
        f"errors={report['errors']} max_reserved_idle={report['max_reserved_idle_s']}s (ack_wait {report['ack_wait_s']}s)"
    )
    return "\n".join(lines)


def _f(value: float | None, width: int = 8) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"
