"""Which devices one ``antenna-flows worker`` command serves, and what each worker is called.

A host serves every GPU it has with one worker process per GPU (as upstream's ``ami worker``
and the Prefect fleet's slots do): ``--devices all`` asks for that, ``--devices cuda:0,cuda:2``
or ``cpu,cpu`` for a list. Pure functions of the spec and the visible GPU count, except
:func:`visible_gpus`, which asks torch (CUDA_VISIBLE_DEVICES, SLURM's GPU binding included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ALL = "all"
_DEVICE = re.compile(r"^(cpu|cuda:\d+)$")


class DeviceSpecError(ValueError):
    """A ``--devices`` list that names no device, an unknown one, or a GPU that is not visible."""


@dataclass(frozen=True)
class DevicePlan:
    """The devices to run one worker on each of, and the sentence that says so at start."""

    devices: list[str]
    why: str


def visible_gpus() -> int:
    """CUDA devices this process can see (0 without torch or CUDA); does not initialise CUDA."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch, no driver: no GPU
        return 0


def plan_devices(spec: list[str], gpu_count: int) -> DevicePlan:
    """The devices ``spec`` (``--devices``) asks for on a host with ``gpu_count`` visible GPUs.

    ``all``: every visible GPU, or one CPU worker on a host without one. Otherwise each entry
    is ``cpu``, ``cuda:N`` or ``cuda`` (= ``cuda:0``), repeats allowed (``cpu,cpu``: two CPU
    workers); a GPU that is not visible is an error, so a typo never silently runs on CPU.
    """
    entries = [e.strip().lower() for e in spec if e.strip()]
    if not entries:
        raise DeviceSpecError("--devices names no device (all, cpu, cuda:N)")
    if ALL in entries:
        if entries != [ALL]:
            raise DeviceSpecError(f"--devices all cannot be combined with other devices: {','.join(entries)}")
        if gpu_count == 0:
            return DevicePlan(["cpu"], "--devices all: no GPU is visible on this host, so one CPU worker")
        devices = [f"cuda:{i}" for i in range(gpu_count)]
        return DevicePlan(devices, f"--devices all: {gpu_count} visible GPU(s), one worker each: {', '.join(devices)}")
    devices = ["cuda:0" if e == "cuda" else e for e in entries]
    for device in devices:
        if not _DEVICE.match(device):
            raise DeviceSpecError(f"--devices: unknown device {device!r} (all, cpu, cuda:N)")
        if device.startswith("cuda:") and int(device.split(":")[1]) >= gpu_count:
            raise DeviceSpecError(f"--devices: {device} is not visible ({gpu_count} GPU(s) visible on this host)")
    return DevicePlan(devices, f"--devices {','.join(devices)}: one worker each")


def worker_names(base: str, devices: list[str]) -> list[str]:
    """One name per device, ``base`` suffixed with it: ``box-cuda0``, ``box-cuda1``; a device named
    twice gets its position too (``box-cpu0``, ``box-cpu1`` for ``cpu,cpu``)."""
    names = []
    for i, device in enumerate(devices):
        tag = device.replace(":", "")
        if devices.count(device) > 1:
            tag = f"{tag}{i}" if device == "cpu" else f"{tag}-{i}"
        names.append(f"{base}-{tag}")
    return names


def auto_device_note(device: str, gpu_count: int) -> str | None:
    """What to say when ``device=auto`` picks one GPU of several (None when there is nothing to say)."""
    if device != "auto" or gpu_count < 2:
        return None
    return (f"device auto: this worker uses cuda:0 only, of {gpu_count} visible GPUs; `--devices all` runs one "
            "worker per GPU (or --device cuda:N to choose one)")
