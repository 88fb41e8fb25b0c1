"""The ``antenna-flows`` command.

Every setting is an option: :func:`add_settings_arguments` turns each field
of a settings class into ``--kebab-name`` with its description, default and
environment variable in ``--help``, and :func:`settings_from_args` builds the
settings from environment and ``.env`` overridden by the options given.

A subcommand is one ``add_<name>(subparsers)`` function that configures its
parser and sets ``func``; :data:`SUBCOMMANDS` lists the product's own.

The lab (``antenna-flows-lab``: the local Antenna, demo, bench) is a separate
distribution that plugs its commands in through the ``antenna_flows.commands``
entry point group, and the ``drain`` baseline through ``antenna_flows.strategies``;
without it those commands say how to install it. Nothing here imports the lab.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import types
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from antenna_flows.antenna_client import AntennaError
from antenna_flows.devices import DeviceSpecError
from antenna_flows.registration import RegistrationFailed
from antenna_flows.settings import (
    ENV_PREFIX,
    AntennaSettings,
    HostSettings,
    WorkerSettings,
    env_names,
    upstream_notes,
)
from antenna_flows.unreachable import ServiceUnreachable, cannot_reach, is_nats_unreachable, transport_cause
from antenna_flows.worker import FatalWorkerError

log = logging.getLogger("antenna_flows.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
COMMANDS_GROUP = "antenna_flows.commands"  # entry points: add(subparsers) of commands from other distributions
STRATEGIES_GROUP = "antenna_flows.strategies"  # entry points: a worker strategy other than fair (the lab's drain)
LAB_INSTALL = "pip install -e './lab'  (from the antenna-flows checkout; `make setup` does it)"
LAB_COMMANDS = {  # what the lab adds, so a product-only install can say where a command went
    "demo": "the whole thing on this machine (local NATS + Antenna, demo images, fair workers)",
    "devstack": "run NATS JetStream and the local Antenna API",
    "submit": "create a job on the local Antenna",
    "jobs": "per-job table of the local Antenna",
    "bench": "run a benchmark scenario",
    "compare": "fair vs the upstream drain pattern, side by side",
    "faults": "the fault table",
}


class ClientSettings(AntennaSettings):
    """Which Antenna API a client command talks to (the same variables as the worker's, upstream's
    names included; the dev token only for a local Antenna)."""


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
        env = " or ".join(env_names(name, field))
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


# --- worker ------------------------------------------------------------------------------------------


def add_worker(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="Run a worker (one per GPU): the fair worker flow, or the upstream drain pattern to compare.",
        description="Serve every incomplete Antenna job of the given pipelines on one GPU (or one worker process per "
        "device with --devices) until SIGTERM/SIGINT or --max-runtime-s. Tasks come over Antenna's REST API unless a "
        "NATS URL is configured (--transport auto). Under Prefect orchestration (default) the worker is a run of the "
        "fair-worker flow reporting to PREFECT_API_URL (or a temporary local Prefect server when unset); --orchestration "
        "plain runs the same code without Prefect (supervisord, systemd, SLURM).",
    )
    parser.add_argument("--strategy", choices=["fair", "drain"], default="fair",
                        help="fair: this project's worker; drain: the upstream pattern (baseline). Default fair.")
    parser.add_argument("--orchestration", choices=["prefect", "plain"], default="prefect",
                        help="prefect: a flow run with task runs and artifacts; plain: the same code without Prefect.")
    parser.add_argument("--pipeline", action="append", default=None, metavar="SLUG", dest="pipeline_list",
                        help="Serve this pipeline (repeatable, as upstream's `ami worker --pipeline`); adds to --pipelines.")
    parser.add_argument("--register", action=argparse.BooleanOptionalAction, default=False,
                        help="Register the served pipelines with Antenna before serving (as `antenna-flows register`: "
                        "--project, else every project the token can see); a failed registration stops the worker.")
    parser.add_argument("--project", type=int, action="append", default=None, metavar="ID",
                        help="With --register: register with this project (repeatable; default every accessible project).")
    add_settings_arguments(parser, WorkerSettings)
    add_settings_arguments(parser, HostSettings)
    for strategy in strategies().values():
        strategy.add_arguments(parser)
    parser.set_defaults(func=run_worker_command)


def strategies() -> dict[str, Any]:
    """Worker strategies other distributions provide (the lab: ``drain``), by name."""
    found = {}
    for ep in entry_points(group=STRATEGIES_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the worker
            log.warning("worker strategy %s (%s) unavailable: %s", ep.name, ep.value, exc)
    return found


def worker_settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    """WorkerSettings from environment, .env and options; ``--pipeline`` (repeated) adds to ``--pipelines``."""
    settings = settings_from_args(WorkerSettings, args)
    extra = list(getattr(args, "pipeline_list", None) or [])
    if extra:
        settings.pipelines = list(dict.fromkeys([*settings.pipelines, *extra]))
    return settings


def log_upstream_notes() -> None:
    for note in upstream_notes():
        log.warning("%s", note)


def run_worker_command(args: argparse.Namespace) -> int:
    from antenna_flows.devices import auto_device_note, plan_devices, visible_gpus, worker_names

    log_upstream_notes()
    settings = worker_settings_from_args(args)
    args.services = {"Antenna": settings.antenna_api_url, "NATS": settings.nats_url}
    host = settings_from_args(HostSettings, args)
    if args.register:
        register_for_worker(settings, args.project)
    if host.devices:
        wants_gpus = any(d.strip().lower() == "all" or d.strip().lower().startswith("cuda") for d in host.devices)
        plan = plan_devices(host.devices, visible_gpus() if wants_gpus else 0)
        if len(plan.devices) > 1:
            from antenna_flows.device_workers import DeviceWorkers

            log.info("%s", plan.why)
            if args.orchestration == "prefect" and not os.environ.get("PREFECT_API_URL"):
                log.warning("no PREFECT_API_URL: each of the %d workers starts a temporary Prefect server of its own; "
                            "set PREFECT_API_URL, or run them with --orchestration plain", len(plan.devices))
            names = worker_names(settings.worker_name if "worker_name" in settings.model_fields_set
                                 else default_base_name(), plan.devices)
            return DeviceWorkers(args.argv, plan.devices, names).run()
        if plan.devices != [settings.device]:
            log.info("%s", plan.why)
        settings.device = plan.devices[0]
    elif settings.model_kind == "ami" and settings.device == "auto":
        note = auto_device_note(settings.device, visible_gpus())
        if note:
            log.warning("%s", note)
    if args.strategy != "fair":
        strategy = strategies().get(args.strategy)
        if strategy is None:
            print(f"error: --strategy {args.strategy} is the lab's baseline, not installed here: {LAB_INSTALL}",
                  file=sys.stderr)
            return 2
        totals = strategy.run(settings, args.orchestration, args)
    else:
        from antenna_flows.runner import run_worker

        totals = run_worker(settings, args.orchestration)
    print(f"worker {settings.worker_name} stopped: {totals}")
    return 0


def default_base_name() -> str:
    """Base of the per-device worker names when none is configured: host and the parent's pid."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


def register_for_worker(settings: WorkerSettings, projects: list[int] | None) -> None:
    """``worker --register``: register what this worker serves, or raise RegistrationFailed (stops it)."""
    import asyncio

    from antenna_flows.registration import register_with_projects

    report = asyncio.run(register_with_projects(
        settings.antenna_api_url, settings.antenna_api_token, projects, settings.antenna_service_name,
        settings.pipelines or None, model_kind=settings.model_kind, weights_dir=settings.weights_dir,
        allow_download=settings.allow_weight_download))
    for line in report.text().splitlines():
        log.info("register: %s", line)
    if not report.ok:
        raise RegistrationFailed(f"registration failed, not serving:\n{report.text()}")


# --- register ---------------------------------------------------------------------------------------


def add_register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "register",
        help="Register this worker's pipelines with Antenna projects (as upstream's `ami worker register`).",
        description="Declare the pipelines and the algorithms their results name, as the processing service "
        "'{AMI_ANTENNA_SERVICE_NAME} ({hostname})', with each --project, or with every project the token can see "
        "(projects that refuse the token are skipped). Exit 0 when registered somewhere and failed nowhere.",
    )
    parser.add_argument("--project", type=int, action="append", default=None, metavar="ID",
                        help="Antenna project id (repeatable; default: every project the token can see).")
    parser.add_argument("--service-name", default=None,
                        help="Processing service name, sent as '{name} ({hostname})' (default: env "
                        "AMI_ANTENNA_SERVICE_NAME, else antenna-flows).")
    parser.add_argument("--pipeline", action="append", default=None, metavar="SLUG", dest="pipeline_list",
                        help="Register only this pipeline (repeatable; default: every pipeline of the model kind). "
                        "With --model-kind sim, X registers sim's own pipeline sim-X.")
    parser.add_argument("--pipelines", default=None, metavar="A,B", help="Pipelines, comma separated (adds to --pipeline).")
    parser.add_argument("--model-kind", choices=("ami", "sim"), default=None,
                        help="Whose algorithms to declare: 'ami' (the real models, with their category maps) or "
                        "'sim' (pipelines of its own, sim-<slug>, for a staging fleet running sim against a real "
                        "Antenna; never a real pipeline). Antenna refuses results naming undeclared algorithms. "
                        "Default: the workers' model kind (env AMI_MODEL_KIND), else ami.")
    parser.add_argument("--json", dest="json_answer", action="store_true", help="Print Antenna's whole answers as JSON.")
    add_settings_arguments(parser, ClientSettings, CLIENT_ALIASES)
    parser.set_defaults(func=run_register)


def run_register(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from antenna_flows.registration import register_with_projects

    log_upstream_notes()
    client = settings_from_args(ClientSettings, args)
    args.services = {"Antenna": client.antenna_api_url}
    worker = WorkerSettings(antenna_api_url=client.antenna_api_url, antenna_api_token=client.antenna_api_token)
    model_kind = args.model_kind or worker.model_kind
    slugs = list(dict.fromkeys([*(args.pipeline_list or []),
                                *[p.strip() for p in (args.pipelines or "").split(",") if p.strip()]])) or None
    report = asyncio.run(register_with_projects(
        client.antenna_api_url, client.antenna_api_token, args.project, args.service_name or worker.antenna_service_name,
        slugs, model_kind=model_kind, weights_dir=worker.weights_dir, allow_download=worker.allow_weight_download))
    if args.json_answer:
        print(json.dumps({str(o.project_id): o.answer if o.answer is not None else {"status": o.status, "detail": o.detail}
                          for o in report.outcomes}, indent=2))
    else:
        print(report.text())
    return 0 if report.ok else 1


# --- the command ----------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Any], None]] = [add_worker, add_register]


def add_plugin_commands(subparsers: Any) -> None:
    """Commands of other distributions (the lab's)."""
    for ep in entry_points(group=COMMANDS_GROUP):
        try:
            ep.load()(subparsers)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the worker command
            log.warning("commands %s (%s) unavailable: %s", ep.name, ep.value, exc)


def add_missing_lab_commands(subparsers: Any) -> None:
    """The lab's commands on a product-only install: each says how to install the lab."""
    for name, what in LAB_COMMANDS.items():
        if name in subparsers.choices:
            continue
        parser = subparsers.add_parser(name, help=f"(lab, not installed) {what}", add_help=False)
        parser.set_defaults(func=functools.partial(_lab_missing, name), lab_missing=True)


def _lab_missing(name: str, args: argparse.Namespace | None = None) -> int:
    print(f"error: `antenna-flows {name}` is a lab command and the lab is not installed: {LAB_INSTALL}",
          file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """No abbreviated options: ``--pipeline`` must never be read as ``--pipelines`` (nor any option as
    another that starts with it), in every subcommand, the lab's included."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="antenna-flows",
        description="Fair GPU workers for the AMI Antenna platform (worker, register), and, with the lab "
        "installed, a local Antenna to run them against (demo, devstack, submit, jobs, bench, compare, faults).",
    )
    parser.add_argument("--log-level", default="INFO", help="Logging level (default INFO).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for add in SUBCOMMANDS:
        add(subparsers)
    add_plugin_commands(subparsers)
    add_missing_lab_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, set up logging, run the subcommand; errors a user can act on become one line and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "lab_missing", False):
        return args.func(args)  # a lab command on a product-only install: whatever its options, say how to get it
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv  # a command that starts copies of itself (worker --devices) reuses it
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns everything else
    try:
        return args.func(args)
    except ValidationError as exc:
        parser.error(f"invalid settings: {_validation_summary(exc)}")
    except DeviceSpecError as exc:
        parser.error(str(exc))
    except AntennaError as exc:
        cause = transport_cause(exc)
        if exc.status is None and cause is not None:
            print(f"error: {cannot_reach(cause, _services(args))}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
    except httpx.TransportError as exc:
        print(f"error: {cannot_reach(exc, _services(args))}", file=sys.stderr)
    except FileNotFoundError as exc:  # missing weights or label maps: the message says how to get them
        print(f"error: {exc}", file=sys.stderr)
    except (RegistrationFailed, FatalWorkerError, ServiceUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except Exception as exc:
        if not is_nats_unreachable(exc):
            raise
        print(f"error: cannot reach NATS at {_services(args).get('NATS')} ({type(exc).__name__}: {exc})", file=sys.stderr)
    return 1


def _services(args: argparse.Namespace) -> dict[str, str | None]:
    """The services a command was aimed at (set by the command), else the Antenna URL it was given."""
    services = dict(getattr(args, "services", None) or {})
    services.setdefault("Antenna", getattr(args, "antenna_api_url", None))
    return services


def _validation_summary(exc: ValidationError) -> str:
    return "; ".join(
        f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg'].removeprefix('Value error, ')}"
        if e["loc"] else e["msg"].removeprefix("Value error, ")
        for e in exc.errors()
    )


if __name__ == "__main__":
    sys.exit(main())
