"""The fleet spec: which fair-worker runs should exist (hosts x GPUs x pipelines), and helpers around it.

A spec is a YAML (or JSON) file, by default ``deployments/fleet.yaml``::

    deployment: fair-worker/gpu-worker   # the worker deployment every slot runs (per host: override)
    stale_after_s: 600                    # Running with no heartbeat this long: marked Crashed (0: never)
    hosts:
      - name: gpu-a
        gpus: [0, 1]                      # or a count: 2
        pipelines: [panama_moths_2024]    # optional: default every pipeline the model knows
        parameters: {max_batch_size: 16}  # optional: more fair_worker parameters

Each (host, GPU) is a *slot* named ``<host>-gpu<N>``: one fair-worker run
(``worker_name=<slot>``, ``device=cuda:<N>``), tagged ``fleet`` and
``fleet-slot:<slot>``, queued on a Prefect work queue of its own named after the slot
with concurrency 1, so a GPU never runs two workers even if two runs exist.
The host's Prefect worker polls only its own slots' Prefect work queues::

    python -m antenna_flows.fleet worker-command gpu-a      # prints the prefect worker start line

Pure Python (no Prefect import): the keeper (:mod:`antenna_flows.fleet.keeper`) and the tests use it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout (ANTENNA_FLOWS_HOME on a host)
DEFAULT_SPEC = PROJECT_ROOT / "deployments" / "fleet.yaml"
SPEC_ENV = "ANTENNA_FLEET_SPEC"
FLEET_TAG = "fleet"
SLOT_TAG_PREFIX = "fleet-slot:"
DEFAULT_DEPLOYMENT = "fair-worker/gpu-worker"
DEFAULT_STALE_AFTER_S = 600.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """The fleet spec is malformed (the message names the field)."""


@dataclass(frozen=True)
class Slot:
    """One GPU of one host: exactly one fair-worker run should exist for it."""

    name: str
    host: str
    gpu: int | None
    deployment: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return SLOT_TAG_PREFIX + self.name

    @property
    def work_queue(self) -> str:
        return self.name

    @property
    def tags(self) -> list[str]:
        return [FLEET_TAG, self.tag]


@dataclass(frozen=True)
class Fleet:
    """Every slot of a spec, and how long a Running slot may be silent before the keeper calls it lost."""

    slots: list[Slot]
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    source: str = ""

    def slot(self, name: str) -> Slot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise KeyError(name)

    def hosts(self) -> list[str]:
        return sorted({s.host for s in self.slots})

    def work_queues_of(self, host: str) -> list[str]:
        return [s.work_queue for s in self.slots if s.host == host]


def spec_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The spec to read: ``path``, else ``$ANTENNA_FLEET_SPEC``, else deployments/fleet.yaml (relative: to the project)."""
    chosen = Path(path or os.environ.get(SPEC_ENV) or DEFAULT_SPEC).expanduser()
    if not chosen.is_absolute() and not chosen.exists():
        chosen = PROJECT_ROOT / chosen
    return chosen


def load_fleet(path: str | os.PathLike[str] | None = None) -> Fleet:
    source = spec_path(path)
    try:
        text = source.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read fleet spec {source}: {exc}") from exc
    data = json.loads(text) if source.suffix == ".json" else yaml.safe_load(text)
    return parse_fleet(data or {}, source=str(source))


def _gpus(value: Any, where: str) -> list[int | None]:
    if value is None:
        return [0]
    if isinstance(value, bool):
        raise SpecError(f"{where}.gpus: a count or a list of GPU indices, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SpecError(f"{where}.gpus: a count >= 0, not {value}")
        return list(range(value))
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        if len(set(value)) != len(value):
            raise SpecError(f"{where}.gpus: repeated GPU index in {value}")
        return list(value)
    raise SpecError(f"{where}.gpus: a count or a list of GPU indices, not {value!r}")


def parse_fleet(data: dict[str, Any], source: str = "") -> Fleet:
    if not isinstance(data, dict):
        raise SpecError("fleet spec: a mapping with 'hosts'")
    default_deployment = str(data.get("deployment") or DEFAULT_DEPLOYMENT)
    default_params = dict(data.get("parameters") or {})
    stale = float(data.get("stale_after_s", DEFAULT_STALE_AFTER_S) or 0)
    hosts = data.get("hosts") or []
    if not isinstance(hosts, list):
        raise SpecError("hosts: a list of {name, gpus, ...}")
    slots: list[Slot] = []
    seen: set[str] = set()
    for i, host in enumerate(hosts):
        where = f"hosts[{i}]"
        if not isinstance(host, dict) or not host.get("name"):
            raise SpecError(f"{where}: needs a name")
        name = str(host["name"])
        if not _NAME.match(name):
            raise SpecError(f"{where}.name: letters, digits, '.', '_' and '-' only, not {name!r}")
        deployment = str(host.get("deployment") or default_deployment)
        if "/" not in deployment:
            raise SpecError(f"{where}.deployment: '<flow name>/<deployment name>', not {deployment!r}")
        params = {**default_params, **dict(host.get("parameters") or {})}
        if host.get("pipelines"):
            params["pipelines"] = list(host["pipelines"])
        if host.get("enabled", True) is False:
            continue
        for gpu in _gpus(host.get("gpus"), where):
            slot_name = f"{name}-gpu{gpu}"
            if slot_name in seen:
                raise SpecError(f"{where}: slot {slot_name} twice")
            seen.add(slot_name)
            slot_params = {**params, "worker_name": slot_name}
            if gpu is not None and "device" not in params:
                slot_params["device"] = f"cuda:{gpu}"
            slots.append(Slot(slot_name, name, gpu, deployment, slot_params))
    return Fleet(slots=slots, stale_after_s=stale, source=source)


def slot_of(tags: list[str] | None) -> str | None:
    """The slot a flow run serves, from its ``fleet-slot:<name>`` tag."""
    for tag in tags or ():
        if tag.startswith(SLOT_TAG_PREFIX):
            return tag[len(SLOT_TAG_PREFIX):]
    return None


def worker_command(fleet: Fleet, host: str, pool: str | None = None) -> list[str]:
    """``prefect worker start`` for one host: only its slots' Prefect work queues (a pool shared by hosts)."""
    queues = fleet.work_queues_of(host)
    if not queues:
        raise SpecError(f"no slot on host {host!r} (hosts: {', '.join(fleet.hosts()) or 'none'})")
    command = ["prefect", "worker", "start", "--pool", pool or "gpu-pool", "--name", f"{host}-worker"]
    for queue in queues:
        command += ["--work-queue", queue]
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m antenna_flows.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=None, help=f"fleet spec (default: ${SPEC_ENV} or {DEFAULT_SPEC})")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("slots", help="list the slots of the spec")
    cmd = sub.add_parser("worker-command", help="the prefect worker start line of one host")
    cmd.add_argument("host")
    cmd.add_argument("--pool", default="gpu-pool")
    args = parser.parse_args(argv)
    try:
        fleet = load_fleet(args.spec)
        if args.command == "slots":
            for slot in fleet.slots:
                print(f"{slot.name}\t{slot.deployment}\tqueue={slot.work_queue}\t{json.dumps(slot.parameters)}")
        else:
            print(" ".join(worker_command(fleet, args.host, args.pool)))
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
