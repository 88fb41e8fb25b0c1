"""The lab's commands: a local Antenna, demo, bench, compare, faults, and the drain baseline.

They plug into the product's ``antenna-flows`` command (entry point group
``antenna_flows.commands``, see ``antenna_flows.cli``) and also stand alone as
``antenna-lab``. The ``drain`` worker strategy (``antenna-flows worker
--strategy drain``) plugs in through ``antenna_flows.strategies``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from antenna_flows.cli import (
    CLIENT_ALIASES,
    LOG_FORMAT,
    ClientSettings,
    add_settings_arguments,
    settings_from_args,
)
from antenna_flows.settings import WorkerSettings
from antenna_lab.antenna.admin import AntennaAdmin
from antenna_lab.antenna.models import Job
from antenna_lab.settings import ApiSettings, DrainSettings, QueueSettings

log = logging.getLogger("antenna_lab.cli")

DEFAULT_PIPELINE = "panama_moths_2024"
SCENARIOS_DIR = Path(__file__).parent / "bench" / "scenarios"
DEFAULT_NATS_PORT = 4222  # the worker's default nats_url: devstack + worker work with no configuration


# --- devstack -------------------------------------------------------------------------------------


def add_devstack(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "devstack",
        help="(lab) Run NATS JetStream and the local Antenna API in the foreground.",
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
        help="Model kinds whose pipelines are registered with project 1 at start, comma separated (default sim,ami; "
        "as an operator runs `register` before starting workers): what each kind declares, ami on the registry "
        "slugs, sim on pipelines of its own (sim-<slug>). Results naming any other algorithm are refused at save "
        "time and never acked, as Antenna does; so are all results of a pipeline with two detection algorithms.",
    )
    parser.add_argument(
        "--reap-dead-letters", action="store_true",
        help="Turn tasks that exhausted max_deliver into error results counted as dead_lettered (off by default, "
        "as in Antenna, where only a management command or the stale-job reaper does that).",
    )
    parser.set_defaults(func=run_devstack)


def run_devstack(args: argparse.Namespace) -> int:
    from antenna_lab.antenna.devstack import DevStack  # uvicorn and FastAPI only for the commands that serve

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
            f"  costs    {_costs_line(stack.costs)}",
            "next:",
            f"  antenna-flows submit --api-url {stack.api_url} --images 20",
            f"  antenna-flows jobs --api-url {stack.api_url}",
            f"  curl -H 'Authorization: Token {stack.token}' '{stack.api_url}/jobs/?ids_only=1&incomplete_only=1'",
            f"  workers elsewhere: {env}",
        ]
    )


def _costs_line(costs: Any) -> str:
    if costs is None:
        return "none (requests and saves are free; --antenna-costs FILE to charge what Antenna charges)"
    r = costs.request_s
    return (f"{costs.web_workers} web workers (jobs {r.jobs:g}s, tasks {r.tasks:g}s, result {r.result:g}s"
            f" + {r.result_per_item:g}s/result), {costs.save_workers} save workers at {costs.save_s_per_result:g}s/result")


# --- submit -----------------------------------------------------------------------------------------


def add_submit(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="(lab) Create a job from N demo images or a file of image URLs.",
        description="Create (and start) a job on the local API: N synthetic frames it serves itself, "
        "or the URLs in a file (one per line, '#' comments).",
    )
    add_settings_arguments(parser, ClientSettings, CLIENT_ALIASES)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-n", "--images", type=int, default=10, metavar="N", help="Number of demo images (default 10).")
    source.add_argument("--urls-file", type=Path, metavar="PATH", help="File of image URLs, one per line.")
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"Pipeline slug (default {DEFAULT_PIPELINE}).")
    parser.add_argument(
        "--for-model-kind", choices=("ami", "sim"), default="ami",
        help="Which workers the job is for (default ami): sim workers serve pipelines of their own, so with sim "
        "the job goes to sim-<pipeline> (a sim-* slug given as --pipeline is kept).",
    )
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
    from antenna_lab.bench.bench import job_pipeline

    with AntennaAdmin(client.antenna_api_url, client.antenna_api_token) as admin:
        job = admin.create_job(
            job_pipeline(args.pipeline, args.for_model_kind),
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
        help="(lab) Per-job table: NATS counts (msgs, pending, ack_pending, redelivered) and results.",
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



# --- bench and demo ---------------------------------------------------------------------------------


def add_bench(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="(lab) Run a benchmark scenario end to end (shared/bench format) and report per job.",
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
        help="(lab) The whole thing on this machine: NATS, a local Antenna, demo images, fair workers, a per-job table.",
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

    from antenna_lab.bench.bench import BenchOptions, Scenario, format_report, run_bench

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
        help="(lab) Run one scenario as fair/Prefect, fair/plain and drain side by side; print the ratios.",
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

    from antenna_lab.bench.bench import Scenario
    from antenna_lab.bench.compare import compare, format_comparison

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
        help="(lab) Run the fault scenarios against the same mix without a fault; print the fault table.",
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
    from antenna_lab.bench.faults import main as faults_main

    argv = ["--strategy", args.strategy, "--orchestration", args.orchestration, "--log-level", "WARNING"]
    if args.only:
        argv += ["--only", *args.only]
    if args.json:
        argv += ["--json", str(args.json)]
    if args.out_dir:
        argv += ["--out-dir", str(args.out_dir)]
    return faults_main(argv)



# --- the drain strategy (antenna-flows worker --strategy drain) -------------------------------------


class DrainStrategy:
    """The upstream drain pattern as a worker strategy: its knobs join ``worker --help``."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_settings_arguments(parser, DrainSettings)

    @staticmethod
    def run(settings: WorkerSettings, orchestration: str, args: argparse.Namespace) -> dict[str, Any]:
        from antenna_lab.bench.drain import run_drain_worker

        return run_drain_worker(settings, orchestration, settings_from_args(DrainSettings, args))


drain_strategy = DrainStrategy()


# --- the command group ------------------------------------------------------------------------------

COMMANDS: list[Callable[[Any], None]] = [
    add_demo, add_devstack, add_submit, add_jobs, add_bench, add_compare, add_faults,
]


def add_commands(subparsers: Any) -> None:
    """Entry point (``antenna_flows.commands``): the lab's commands on ``antenna-flows``."""
    for add in COMMANDS:
        add(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """``antenna-lab``: the lab's commands alone (the same as under ``antenna-flows``)."""
    from antenna_flows.cli import run_command

    parser = argparse.ArgumentParser(prog="antenna-lab", description="The antenna-flows lab: a local Antenna, "
                                     "demo, benchmarks and the upstream drain baseline.")
    parser.add_argument("--log-level", default="INFO", help="Logging level (default INFO).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(subparsers)
    return run_command(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
