"""The recipes in deployments/ for running without a Prefect server: supervisord, systemd, SLURM.

The supervisord program file runs for real (supervisord from PyPI, paths templated for the test):
a worker against a local Antenna with a job in flight is SIGKILLed, supervisord starts it again,
and the job completes with every image answered once and none lost. The SLURM script runs as
written (outside SLURM, with a short time limit) against a local Antenna. Every recipe's
command line must parse with the CLI as it is.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from antenna_flows.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "deployments"
PROGRAM = RECIPES / "supervisord" / "antenna-flows.conf"
UNIT = RECIPES / "systemd" / "antenna-flows@.service"
SBATCH = RECIPES / "slurm" / "antenna-flows.sbatch"
BIN = Path(sys.executable).parent
PIPELINE = "sim-panama_moths_2024"


def _env_file(stack: Any, path: Path, **extra: str) -> None:
    values = {
        "AMI_ANTENNA_API_URL": stack.api_url,
        "AMI_ANTENNA_API_TOKEN": stack.token,
        "AMI_NATS_URL": stack.nats_url,
        "AMI_MODEL_KIND": "sim",
        "AMI_PIPELINES": PIPELINE,
        "AMI_SIM_SECONDS_PER_IMAGE": "0.02",
        "AMI_DISCOVERY_INTERVAL_S": "0.2",
        **extra,
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def _clean_environ() -> dict[str, str]:
    """This process's environment without AMI_* (the recipes read .env, as on a host)."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("AMI_")}


def _wait(what: str, check: Callable[[], Any], timeout: float, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{log.read_text()[-4000:]}" if log and log.exists() else ""))


# --- supervisord ----------------------------------------------------------------------------------


def render_program(workdir: Path, logdir: Path) -> str:
    """The shipped program file with this checkout's paths (and no `user=`: the test is not root)."""
    text = PROGRAM.read_text()
    text = text.replace("/opt/antenna-flows/.venv/bin/", f"{BIN}/").replace("/opt/antenna-flows", str(workdir))
    text = text.replace("/var/log/antenna-flows", str(logdir)).replace('HOME="/home/antenna"', f'HOME="{workdir}"')
    return re.sub(r"^user=.*$", "", text, flags=re.M)


def supervisord_conf(tmp: Path, program: Path) -> Path:
    conf = tmp / "supervisord.conf"
    conf.write_text(
        f"[unix_http_server]\nfile={tmp}/supervisor.sock\n\n"
        f"[supervisord]\nlogfile={tmp}/supervisord.log\npidfile={tmp}/supervisord.pid\nnodaemon=true\n\n"
        "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
        f"[supervisorctl]\nserverurl=unix://{tmp}/supervisor.sock\n\n"
        f"[include]\nfiles={program}\n"
    )
    return conf


def program_state(conf: Path) -> tuple[str, int | None]:
    """(state, pid) of the antenna-flows program, from supervisorctl."""
    out = subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), "status", "antenna-flows"],
                         capture_output=True, text=True, timeout=30).stdout
    words = out.split()
    state = words[1] if len(words) > 1 else "UNKNOWN"
    pid = re.search(r"pid (\d+)", out)
    return state, int(pid.group(1)) if pid else None


@pytest.mark.slow
def test_supervisord_restarts_a_killed_worker_and_nothing_is_lost(stack_factory, tmp_path: Path) -> None:
    stack = stack_factory(ack_wait_s=4.0, max_deliver=5, register_kinds=("sim",))
    images = 600  # ~12 s of sim work: in flight at the kill, done after the restart
    stack.create_job(PIPELINE, images, job_id=91)
    workdir, logdir = tmp_path / "home", tmp_path / "log"
    workdir.mkdir()
    logdir.mkdir()
    _env_file(stack, workdir / ".env")
    program = tmp_path / "antenna-flows.conf"
    program.write_text(render_program(workdir, logdir))
    conf = supervisord_conf(tmp_path, program)
    worker_log = logdir / "worker.log"
    supervisord = subprocess.Popen([str(BIN / "supervisord"), "-c", str(conf)], env=_clean_environ(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        first = _wait("the worker RUNNING", lambda: (s := program_state(conf))[0] == "RUNNING" and s[1], 60, worker_log)
        _wait("results from the first worker", lambda: stack.store.job(91).results > 0, 60, worker_log)
        assert stack.store.job(91).results < images, "the job finished before the kill: make it longer"
        os.kill(first, signal.SIGKILL)
        second = _wait("supervisord to start the worker again",
                       lambda: (s := program_state(conf))[0] == "RUNNING" and s[1] != first and s[1], 60, worker_log)
        job = _wait("the job to complete", lambda: (j := stack.store.job(91)).results + j.errors >= images and j, 120,
                    worker_log)
        assert (job.results, job.errors, job.duplicates, job.total) == (images, 0, 0, images)
        assert job.redeliveries > 0  # the killed worker's reservations came back, and were answered once
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), "stop", "antenna-flows"], check=True,
                       capture_output=True, timeout=150)
        assert program_state(conf)[0] == "STOPPED"
        assert second != first
    finally:
        supervisord.send_signal(signal.SIGTERM)
        try:
            supervisord.wait(150)
        except subprocess.TimeoutExpired:
            supervisord.kill()
    events = (tmp_path / "supervisord.log").read_text()
    assert "exited: antenna-flows (terminated by SIGKILL" in events
    assert "stopped: antenna-flows (exit status 0)" in events  # the restarted worker stopped cleanly
    assert worker_log.read_text().count("serving pipelines") == 2


# --- SLURM ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_slurm_script_registers_then_runs_until_its_time_limit(stack_factory, tmp_path: Path) -> None:
    """Outside SLURM, as written: `antenna-flows register` (every project), then the workers under
    `timeout --signal=SIGTERM`; they stop cleanly at the limit and the script exits 0."""
    stack = stack_factory(register_kinds=())
    stack.create_job(PIPELINE, 20, job_id=92)
    home = tmp_path / "checkout"
    home.mkdir()
    (home / ".venv").symlink_to(Path(sys.prefix))
    _env_file(stack, home / ".env", AMI_ANTENNA_SERVICE_NAME="slurm test")
    env = {**_clean_environ(), "ANTENNA_FLOWS_HOME": str(home), "AF_RUN_TIME": "15s", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Workers reached the time limit and stopped cleanly." in out.stdout
    assert "project 1 (Default project): registered" in out.stdout
    assert stack.store.algorithm_keys(1, PIPELINE) == {"sim-detector", "sim-classifier"}
    job = stack.store.job(92)
    assert (job.results, job.duplicates) == (20, 0)
    assert "stopping (SIGTERM)" in out.stderr


def test_the_slurm_script_refuses_an_unedited_account(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(SBATCH)], env={**_clean_environ(), "SLURM_JOB_ACCOUNT": "def-YOUR_ACCOUNT"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "Replace --account" in out.stderr


# --- every recipe's command is one the CLI takes ----------------------------------------------------


def _recipe_commands() -> list[tuple[str, list[str]]]:
    program = re.search(r"^command=(.*)$", PROGRAM.read_text(), re.M)
    unit = re.findall(r"^#?\s*Exec(?:Start|StartPre)=(.*)$", UNIT.read_text(), re.M)
    sbatch = SBATCH.read_text().replace("\\\n", " ")
    slurm = [line.strip() for line in sbatch.splitlines() if line.strip().startswith("antenna-flows ")]
    slurm += re.findall(r"(antenna-flows worker [^|]*)", sbatch)
    assert program and len(unit) == 2 and len(slurm) == 2
    found = [("supervisord", program.group(1))] + [("systemd", u.replace("%i", "all")) for u in unit]
    found += [("slurm", s) for s in slurm]
    return [(where, shlex.split(cmd)[1:]) for where, cmd in found]


@pytest.mark.parametrize("where,argv", _recipe_commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_recipe_commands_parse(where: str, argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        assert args.orchestration == "plain" and args.devices, where  # no Prefect server; every GPU


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` of an instance, with this checkout's paths (where systemd is installed)."""
    analyze = shutil.which("systemd-analyze")
    text = UNIT.read_text().replace("/opt/antenna-flows/.venv/bin/", f"{BIN}/")
    unit = tmp_path / "antenna-flows@all.service"
    unit.write_text(text)
    assert "ExecStart=" in text and "KillMode=mixed" in text and "--devices %i" in text
    if analyze is None:  # the unit's shape is checked above; its syntax needs systemd
        return
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "antenna-flows@all.service" in line and "User=" not in line and "WorkingDirectory" not in line]
    assert not problems, problems
