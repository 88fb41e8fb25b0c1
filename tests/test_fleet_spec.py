"""The fleet spec (antenna_flows/fleet/spec.py): slots, their runs' parameters, queues and tags, errors that
name the field, the specs shipped in deployments/, and a GPU host's ``prefect worker start`` line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from antenna_flows.fleet.spec import SpecError, load_fleet, parse_fleet, slot_of, worker_command

ROOT = Path(__file__).resolve().parent.parent


def test_fleet_spec_slots_queues_and_worker_command():
    fleet = parse_fleet({
        "deployment": "fair-worker/gpu-worker",
        "stale_after_s": 120,
        "hosts": [
            {"name": "gpu-a", "gpus": [0, 2], "pipelines": ["panama_moths_2024"], "parameters": {"max_batch_size": 16}},
            {"name": "gpu-b", "gpus": 1, "deployment": "fair-worker/sim-worker", "parameters": {"device": "cpu"}},
            {"name": "gpu-c", "gpus": 4, "enabled": False},
        ],
    })
    assert [s.name for s in fleet.slots] == ["gpu-a-gpu0", "gpu-a-gpu2", "gpu-b-gpu0"]
    a2 = fleet.slot("gpu-a-gpu2")
    assert a2.parameters == {"max_batch_size": 16, "pipelines": ["panama_moths_2024"], "worker_name": "gpu-a-gpu2", "device": "cuda:2"}
    assert a2.work_queue == "gpu-a-gpu2" and a2.tags == ["fleet", "fleet-slot:gpu-a-gpu2"]
    assert slot_of(["antenna", "fleet", "fleet-slot:gpu-a-gpu2"]) == "gpu-a-gpu2" and slot_of(["x"]) is None
    assert fleet.slot("gpu-b-gpu0").parameters["device"] == "cpu"
    assert fleet.slot("gpu-b-gpu0").deployment == "fair-worker/sim-worker"
    assert fleet.stale_after_s == 120
    assert worker_command(fleet, "gpu-a") == [
        "prefect", "worker", "start", "--pool", "gpu-pool", "--name", "gpu-a-worker",
        "--work-queue", "gpu-a-gpu0", "--work-queue", "gpu-a-gpu2",
    ]
    with pytest.raises(SpecError):
        worker_command(fleet, "nope")


@pytest.mark.parametrize("bad", [
    {"hosts": [{"gpus": 1}]},
    {"hosts": [{"name": "a b"}]},
    {"hosts": [{"name": "a", "gpus": [0, 0]}]},
    {"hosts": [{"name": "a", "gpus": -1}]},
    {"hosts": [{"name": "a", "deployment": "no-slash"}]},
    {"hosts": [{"name": "a"}, {"name": "a"}]},
    {"hosts": "a"},
])
def test_fleet_spec_errors_name_the_field(bad):
    with pytest.raises(SpecError):
        parse_fleet(bad)


def test_shipped_specs_parse():
    gpu = load_fleet(ROOT / "deployments" / "fleet.yaml")
    assert gpu.slots and all(s.deployment == "fair-worker/gpu-worker" for s in gpu.slots)
    sim = load_fleet(ROOT / "deployments" / "fleet-sim.yaml")
    assert [s.name for s in sim.slots] == ["local-gpu0", "local-gpu1"]
    assert all(s.parameters["device"] == "cpu" for s in sim.slots)
    assert json.dumps([s.parameters for s in sim.slots])  # parameters travel as JSON


def test_the_default_spec_is_the_checkouts(monkeypatch):
    """No path, no ANTENNA_FLEET_SPEC: deployments/fleet.yaml of the checkout, wherever the command runs."""
    monkeypatch.delenv("ANTENNA_FLEET_SPEC", raising=False)
    monkeypatch.chdir("/")
    assert load_fleet().source == str(ROOT / "deployments" / "fleet.yaml")
    monkeypatch.setenv("ANTENNA_FLEET_SPEC", "deployments/fleet-sim.yaml")  # relative: to the checkout
    assert [s.name for s in load_fleet().slots] == ["local-gpu0", "local-gpu1"]


def test_worker_command_from_the_shell():
    """What a GPU host runs (README, docs/operations.md): ``python -m antenna_flows.fleet worker-command <host>``."""
    spec = str(ROOT / "deployments" / "fleet-sim.yaml")
    done = subprocess.run([sys.executable, "-m", "antenna_flows.fleet", "--spec", spec, "worker-command", "local"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["prefect", "worker", "start", "--pool", "gpu-pool", "--name", "local-worker",
                                   "--work-queue", "local-gpu0", "--work-queue", "local-gpu1"]
    missing = subprocess.run([sys.executable, "-m", "antenna_flows.fleet", "--spec", spec, "worker-command", "nope"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert missing.returncode == 2 and "no slot on host 'nope'" in missing.stderr
