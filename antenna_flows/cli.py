"""The ``antenna-flows`` command.

Every setting is an option: :func:`add_settings_arguments` turns each field
of a settings class into ``--kebab-name`` with its description, default and
environment variable in ``--help``, and :func:`settings_from_args` builds the
settings from environment and ``.env`` overridden by the options given.

A subcommand is one ``add_<name>(subparsers)`` function that configures its
parser and sets ``func``; :data:`SUBCOMMANDS` lists them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from antenna_flows.lab.antenna.admin import AntennaAdmin, AntennaError
from antenna_flows.lab.antenna.models import Job
from antenna_flows.registration import RegistrationFailed
from antenna_flows.settings import (
    DEFAULT_API_URL,
    DEFAULT_TOKEN,
    ENV_PREFIX,
    ApiSettings,
    DrainSettings,
    QueueSettings,
    WorkerSettings,
)
from antenna_flows.worker import FatalWorkerError

log = logging.getLogger("antenna_flows.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_PIPELINE = "panama_moths_2024"
SCENARIOS_DIR = Path(__file__).parent / "lab" / "bench" / "scenarios"
DEFAULT_NATS_PORT = 4222  # the worker's default nats_url: devstack + worker work with no configuration


class ClientSettings(BaseSettings):
    """Which Antenna API a client command talks to (the same variables as the worker's)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    antenna_api_url: str = Field(DEFAULT_API_URL, description="Base URL of the Antenna API (ending in /api/v2).")
    antenna_api_token: str = Field(DEFAULT_TOKEN, description="API token (sent as 'Authorization: Token ...').")


CLIENT_ALIASES = {"antenna_api_url": ["--api-url"], "antenna_api_token": ["--token"]}


# --- settings as options ----------------------------------------------------------------------


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    settings_cls: type[BaseSettings],
    aliases: dict[str, Sequence[str]] | None = None,
) -> None:
    """One ``--kebab-name`` option per field of ``settings_cls`` (default None: "not given").

    A field another settings class already added to this parser is skipped,
    so two classes sharing a field share its option.
    """
    group = parser.add_argument_group(f"{settings_cls.__name__} (environment {ENV_PREFIX}*, .env)")
    for name, field in settings_cls.model_fields.items():
        flags = [f"--{name.replace('_', '-')}", *(aliases or {}).get(name, ())]
        if any(flag in parser._option_string_actions for flag in flags):  # noqa: SLF001 - argparse has no public lookup
            continue
        default = field.get_default(call_default_factory=True)
        env = f"{ENV_PREFIX}{name.upper()}"
        text = f"{field.description or name} (default: {_shown(default)}; env {env})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": text}
        annotation = _unoptional(field.annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(annotation)]
        else:
            kwargs["metavar"] = _metavar(annotation)
        group.add_argument(*flags, **kwargs)


def settings_from_args(settings_cls: type[BaseSettings], args: argparse.Namespace) -> Any:
    """``settings_cls`` from environment and .env, overridden by the options given on the command line."""
    given = {name: getattr(args, name) for name in settings_cls.model_fields if getattr(args, name, None) is not None}
    return settings_cls(**given)


def _unoptional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _metavar(annotation: Any) -> str:
    if annotation in (int, float, str):
        return annotation.__name__.upper()
    if annotation is Path:
        return "PATH"
    if typing.get_origin(annotation) is list:
        return "A,B"
    return "VALUE"


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "unset" if value is None else str(value)


# --- devstack -------------------------------------------------------------------------------------


def add_devstack(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "devstack",
        help="Run NATS JetStream and the local Antenna API in the foreground.",
        description="Start an embedded nats-server (unless --nats-url is given) and the Antenna-compatible API, "
        "print where they are, and run until Ctrl-C. State lives in --data-dir and survives restarts.",
    )
    add_settings_arguments(parser, QueueSettings)
    add_settings_arguments(parser, ApiSettings)
    parser.add_argument(
        "--nats-port", type=int, default=DEFAULT_NATS_PORT, help="Port of the embedded nats-server (0: any free port)."
    )
    parser.add_argument(
        "--register-kinds", default="sim,ami", metavar="KINDS",
        help="Model kinds whose algorithms are registered for every pipeline of project 1 at start, comma separated "
        "(default sim,ami; as an operator runs `register` before starting workers). Results naming any other "
        "algorithm are refused at save time and never acked, as Antenna does.",
    )
    parser.add_argument(
        "--reap-dead-letters", action="store_true",
        help="Turn tasks that exhausted max_deliver into error results counted as dead_lettered (off by default, "
        "as in Antenna, where only a management command or the stale-job reaper does that).",
    )
    parser.set_defaults(func=run_devstack)


def run_devstack(args: argparse.Namespace) -> int:
    from antenna_flows.lab.antenna.devstack import DevStack  # uvicorn and FastAPI only for the commands that serve

    queue: QueueSettings = settings_from_args(QueueSettings, args)
    api: ApiSettings = settings_from_args(ApiSettings, args)
    kinds = [k.strip() for k in args.register_kinds.split(",") if k.strip()]
    stack = DevStack(queue, api, nats_port=args.nats_port, register_kinds=kinds, reap_dead_letters=args.reap_dead_letters)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with stack:
        print(_devstack_banner(stack), flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        print("stopping...", flush=True)
    return 0


def _devstack_banner(stack: Any) -> str:
    q = stack.queue_settings
    env = f"AMI_ANTENNA_API_URL={stack.api_url} AMI_ANTENNA_API_TOKEN={stack.token} AMI_NATS_URL={stack.nats_url}"
    return "\n".join(
        [
            "antenna-flows devstack is up (Ctrl-C to stop)",
            f"  API      {stack.api_url}",
            f"  token    {stack.token}   (header  Authorization: Token {stack.token})",
            f"  NATS     {stack.nats_url}",
            f"  images   {stack.base_url}/images/demo/640x480/example.jpg",
            f"  data     {stack.store.path}",
            f"  queue    ack_wait {q.nats_task_ttr:g}s, max_deliver {q.nats_max_deliver},"
            f" max_ack_pending {q.nats_max_ack_pending} (for new jobs)",
            "next:",
            f"  antenna-flows submit --api-url {stack.api_url} --images 20",
            f"  antenna-flows jobs --api-url {stack.api_url}",
            f"  curl -H 'Authorization: Token {stack.token}' '{stack.api_url}/jobs/?ids_only=1&incomplete_only=1'",
            f"  workers elsewhere: {env}",
        ]
    )


# --- submit -----------------------------------------------------------------------------------------


def add_submit(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="Create a job from N demo images or a file of image URLs.",
        description="Create (and start) a job on the local API: N synthetic frames it serves itself, "
        "or the URLs in a file (one per line, '#' comments).",
    )
    add_settings_arguments(parser, ClientSettings, CLIENT_ALIASES)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-n", "--images", type=int, default=10, metavar="N", help="Number of demo images (default 10).")
    source.add_argument("--urls-file", type=Path, metavar="PATH", help="File of image URLs, one per line.")
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"Pipeline slug (default {DEFAULT_PIPELINE}).")
    parser.add_argument("--priority", type=int, default=0, help="Job priority, higher first (default 0).")
    parser.add_argument("--missing", type=int, default=0, help="Demo images that answer 404 (default 0).")
    parser.add_argument("--corrupt", type=int, default=0, help="Demo images that are truncated JPEGs (default 0).")
    parser.add_argument("--width", type=int, default=640, help="Demo image width (default 640).")
    parser.add_argument("--height", type=int, default=480, help="Demo image height (default 480).")
    parser.add_argument("--job-id", type=int, help="Job id (default: the next free one).")
    parser.add_argument("--name", help="Job name.")
    parser.add_argument("--no-start", dest="start", action="store_false", help="Create the job without queueing its tasks.")
    parser.set_defaults(func=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    client: ClientSettings = settings_from_args(ClientSettings, args)
    images: int | list[str] = args.images
    if args.urls_file is not None:
        lines = (line.strip() for line in args.urls_file.read_text().splitlines())
        images = [line for line in lines if line and not line.startswith("#")]
    with AntennaAdmin(client.antenna_api_url, client.antenna_api_token) as admin:
        job = admin.create_job(
            args.pipeline,
            images,
            priority=args.priority,
            job_id=args.job_id,
            name=args.name,
            start=args.start,
            width=args.width,
            height=args.height,
            missing=args.missing,
            corrupt=args.corrupt,
        )
    print(f"job {job.id} {job.status}: {job.total} images, pipeline {job.pipeline_slug}, priority {job.priority}")
    return 0


# --- jobs -----------------------------------------------------------------------------------------------

JOB_COLUMNS: list[tuple[str, Callable[[Job], Any]]] = [
    ("id", lambda j: j.id),
    ("pipeline", lambda j: j.pipeline_slug),
    ("priority", lambda j: j.priority),
    ("status", lambda j: j.status),
    ("msgs", lambda j: j.messages),
    ("pending", lambda j: j.pending),
    ("ack_pending", lambda j: j.ack_pending),
    ("redelivered", lambda j: j.redelivered),
    ("redeliveries", lambda j: j.redeliveries),
    ("results", lambda j: j.results),
    ("errors", lambda j: j.errors),
    ("duplicates", lambda j: j.duplicates),
    ("total", lambda j: j.total),
]


def format_jobs_table(jobs: Sequence[Job]) -> str:
    """The field report's per-job table, plus cumulative redeliveries, results, errors and duplicates."""
    rows = [[h for h, _ in JOB_COLUMNS]] + [[str(get(j)) for _, get in JOB_COLUMNS] for j in jobs]
    widths = [max(len(row[c]) for row in rows) for c in range(len(JOB_COLUMNS))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if c in (1, 3) else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def add_jobs(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "jobs",
        help="Per-job table: NATS counts (msgs, pending, ack_pending, redelivered) and results.",
        description="One row per job, oldest first. NATS counts are sampled every second while a job is active "
        "and frozen at its completion or cancellation.",
    )
    add_settings_arguments(parser, ClientSettings, CLIENT_ALIASES)
    parser.add_argument("--incomplete", action="store_true", help="Only jobs not yet SUCCESS, FAILURE or REVOKED.")
    parser.add_argument("--pipeline", action="append", help="Only jobs of this pipeline (repeatable).")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="Redraw every SECONDS until Ctrl-C.")
    parser.set_defaults(func=run_jobs)


def run_jobs(args: argparse.Namespace) -> int:
    client: ClientSettings = settings_from_args(ClientSettings, args)
    with AntennaAdmin(client.antenna_api_url, client.antenna_api_token) as admin:
        while True:
            jobs = sorted(admin.jobs(incomplete_only=args.incomplete, pipelines=args.pipeline), key=lambda j: j.id)
            table = format_jobs_table(jobs) if jobs else "no jobs"
            if not args.watch:
                print(table)
                return 0
            print(f"\x1b[2J\x1b[H{time.strftime('%H:%M:%S')}  {client.antenna_api_url}\n{table}", flush=True)
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return 0


# --- worker ------------------------------------------------------------------------------------------


def add_worker(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="Run one worker (one GPU): the fair worker flow, or the upstream drain pattern to compare.",
        description="Serve every incomplete Antenna job of the given pipelines on one GPU until SIGTERM/SIGINT "
        "or --max-runtime-s. Under Prefect orchestration (default) the worker is a run of the fair-worker flow "
        "reporting to PREFECT_API_URL (or a temporary local Prefect server when unset).",
    )
    parser.add_argument("--strategy", choices=["fair", "drain"], default="fair",
                        help="fair: this project's worker; drain: the upstream pattern (baseline). Default fair.")
    parser.add_argument("--orchestration", choices=["prefect", "plain"], default="prefect",
                        help="prefect: a flow run with task runs and artifacts; plain: the same code without Prefect.")
    add_settings_arguments(parser, WorkerSettings)
    add_settings_arguments(parser, DrainSettings)
    parser.set_defaults(func=run_worker_command)


def run_worker_command(args: argparse.Namespace) -> int:
    settings = settings_from_args(WorkerSettings, args)
    if args.strategy == "drain":
        from antenna_flows.lab.bench.drain import run_drain_worker

        totals = run_drain_worker(settings, args.orchestration, settings_from_args(DrainSettings, args))
    else:
        from antenna_flows.runner import run_worker

        totals = run_worker(settings, args.orchestration)
    print(f"worker {settings.worker_name} stopped: {totals}")
    return 0


# --- bench and demo ---------------------------------------------------------------------------------


def add_bench(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="Run a benchmark scenario end to end (shared/bench format) and report per job.",
        description="Start nats-server, the local API and the scenario's workers as separate processes, submit "
        "its jobs and faults at their times, and report (shared/bench/README.md).",
    )
    parser.add_argument("--scenario", required=True, help="Scenario JSON file, or the name of a bundled one "
                        f"({', '.join(bundled_scenarios())}).")
    parser.add_argument("--strategy", choices=["fair", "drain"], default="fair")
    parser.add_argument("--orchestration", choices=["prefect", "plain"], default="prefect")
    parser.add_argument("--transport", choices=["nats", "rest"], default=None,
                        help="How fair workers reach tasks (overrides the scenario's; drain always uses REST).")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="Write the report here.")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="Keep worker logs and metrics here (default: a temporary directory, removed).")
    parser.set_defaults(func=run_bench_command)


def add_demo(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="The whole thing on this machine: NATS, a local Antenna, demo images, fair workers, a per-job table.",
        description="Run the field report's mix of six concurrent jobs (2x10, 2x100, 2x500 images) through "
        "four fair workers (sim model, Prefect flows) on an embedded stack and print what each job got.",
    )
    parser.add_argument("--scenario", default="demo", help="Bundled scenario name or JSON file (default: demo).")
    parser.add_argument("--orchestration", choices=["prefect", "plain"], default="prefect")
    parser.add_argument("--strategy", choices=["fair", "drain"], default="fair",
                        help="Run the upstream drain pattern instead, to see the field report's problem.")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="Also write the report here.")
    parser.add_argument("--out-dir", type=Path, default=None, help="Keep worker logs and metrics here.")
    parser.set_defaults(func=run_bench_command)


def bundled_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.json"))


def scenario_path(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    bundled = SCENARIOS_DIR / f"{name}.json"
    if bundled.exists():
        return bundled
    raise SystemExit(f"error: no scenario file {name!r} (bundled: {', '.join(bundled_scenarios())})")


def run_bench_command(args: argparse.Namespace) -> int:
    import json

    from antenna_flows.lab.bench.bench import BenchOptions, Scenario, format_report, run_bench

    scenario = Scenario.load(scenario_path(args.scenario))
    options = BenchOptions(strategy=args.strategy, orchestration=args.orchestration, out_dir=args.out_dir,
                           transport=getattr(args, "transport", None))
    print(f"running {scenario.name}: {len(scenario.jobs)} jobs, {sum(j.images for j in scenario.jobs)} images, "
          f"{scenario.workers} {args.strategy} workers ({args.orchestration}); starting the stack...", flush=True)
    report = run_bench(scenario, options)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 0 if report["lost"] == 0 else 3


def add_compare(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="Run one scenario as fair/Prefect, fair/plain and drain side by side; print the ratios.",
        description="The figures of BENCHMARKS.md: the fair worker under Prefect and plain (--fair-runs each) and "
        "the upstream drain pattern (--drain-runs, its random job choice makes it swing), interleaved on this "
        "machine in one invocation, medians and ratios at the end.",
    )
    parser.add_argument("--scenario", required=True, help="Scenario JSON file or bundled name.")
    parser.add_argument("--fair-runs", type=int, default=2, help="Repeats of each fair variant (default 2).")
    parser.add_argument("--drain-runs", type=int, default=3, help="Repeats of the drain baseline (default 3).")
    parser.add_argument("--small", type=int, default=10, help="Jobs of at most this many images count as small.")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="Write every report here.")
    parser.add_argument("--out-dir", type=Path, default=None, help="Keep worker logs and metrics here.")
    parser.set_defaults(func=run_compare_command)


def run_compare_command(args: argparse.Namespace) -> int:
    import json

    from antenna_flows.lab.bench.bench import Scenario
    from antenna_flows.lab.bench.compare import compare, format_comparison

    result = compare(Scenario.load(scenario_path(args.scenario)), args.fair_runs, args.drain_runs, args.small,
                     args.out_dir)
    print(format_comparison(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_faults(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "faults",
        help="Run the fault scenarios against the same mix without a fault; print the fault table.",
        description="faults-none, then each faults-* scenario (one fault each on one mix): lost, dead-lettered, "
        "duplicates, redeliveries, time to recover, throughput vs the no-fault run.",
    )
    parser.add_argument("--strategy", choices=["fair", "drain"], default="fair")
    parser.add_argument("--orchestration", choices=["prefect", "plain"], default="plain",
                        help="prefect also runs faults-prefect-down. Default plain.")
    parser.add_argument("--only", nargs="*", default=None, metavar="NAME", help="Only these fault scenarios.")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="Write every report here.")
    parser.add_argument("--out-dir", type=Path, default=None, help="Keep worker logs and metrics here.")
    parser.set_defaults(func=run_faults_command)


def run_faults_command(args: argparse.Namespace) -> int:
    from antenna_flows.lab.bench.faults import main as faults_main

    argv = ["--strategy", args.strategy, "--orchestration", args.orchestration, "--log-level", "WARNING"]
    if args.only:
        argv += ["--only", *args.only]
    if args.json:
        argv += ["--json", str(args.json)]
    if args.out_dir:
        argv += ["--out-dir", str(args.out_dir)]
    return faults_main(argv)


# --- register ---------------------------------------------------------------------------------------


def add_register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "register",
        help="Register this worker's pipelines with an Antenna project (as the upstream worker does).",
    )
    parser.add_argument("--project", type=int, required=True, metavar="ID", help="Antenna project id.")
    parser.add_argument("--service-name", default=None, help="Processing service name (default: antenna-flows).")
    parser.add_argument("--pipeline", action="append", default=None, metavar="SLUG",
                        help="Register only this pipeline (repeatable; default: every pipeline in the registry).")
    parser.add_argument("--model-kind", choices=("ami", "sim"), default=None,
                        help="Whose algorithms to declare: 'ami' (the real models, with their category maps) or "
                        "'sim' (the simulated detector and classifier, for a staging fleet running sim against a "
                        "real Antenna). Antenna refuses results naming undeclared algorithms. Default: the "
                        "workers' model kind (env AMI_MODEL_KIND), else ami.")
    parser.add_argument("--json", dest="json_answer", action="store_true", help="Print Antenna's whole answer as JSON.")
    add_settings_arguments(parser, ClientSettings, CLIENT_ALIASES)
    parser.set_defaults(func=run_register)


def run_register(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from antenna_flows.registration import register_pipelines, summary

    client = settings_from_args(ClientSettings, args)
    model_kind = args.model_kind or WorkerSettings().model_kind
    answer = asyncio.run(register_pipelines(client.antenna_api_url, client.antenna_api_token, args.project,
                                            service_name=args.service_name, slugs=args.pipeline,
                                            model_kind=model_kind))
    if args.json_answer:
        print(json.dumps(answer, indent=2))
    else:
        print(f"project {args.project}, model kind {model_kind}:")
        print(summary(answer, args.pipeline))
    return 0


# --- the command ----------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Any], None]] = [
    add_demo, add_worker, add_bench, add_compare, add_faults, add_devstack, add_submit, add_jobs, add_register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="antenna-flows",
        description="Fair GPU workers for the AMI Antenna platform, and a local Antenna to run them against.",
    )
    parser.add_argument("--log-level", default="INFO", help="Logging level (default INFO).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns everything else
    try:
        return args.func(args)
    except ValidationError as exc:
        parser.error(f"invalid settings: {_validation_summary(exc)}")
    except AntennaError as exc:
        if exc.status is None and isinstance(exc.__cause__, httpx.TransportError):
            print(f"error: cannot reach the API ({exc}); is `antenna-flows devstack` running?", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
    except httpx.TransportError as exc:
        print(f"error: cannot reach the API ({exc}); is `antenna-flows devstack` running?", file=sys.stderr)
    except FileNotFoundError as exc:  # missing weights or label maps: the message says how to get them
        print(f"error: {exc}", file=sys.stderr)
    except (RegistrationFailed, FatalWorkerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


def _validation_summary(exc: ValidationError) -> str:
    return "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())


if __name__ == "__main__":
    sys.exit(main())
