"""One command, every device: `worker --devices` plans one worker per device and supervises them.

The plan is pure (a spec and a GPU count); the supervision runs for real: two CPU worker
processes (sim model) against a local Antenna and the session's nats-server, stopped by SIGTERM
(exit 0, nothing doubled) or broken by a SIGKILLed child (the other is stopped, exit 137).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from antenna_flows.cli import main
from antenna_flows.devices import DeviceSpecError, auto_device_note, plan_devices, visible_gpus, worker_names

PIPELINE = "sim-panama_moths_2024"


# --- the plan (pure) ---------------------------------------------------------------------------


def test_all_means_every_visible_gpu_or_one_cpu_worker() -> None:
    assert plan_devices(["all"], 3).devices == ["cuda:0", "cuda:1", "cuda:2"]
    none = plan_devices(["all"], 0)
    assert none.devices == ["cpu"] and "no GPU is visible" in none.why


def test_a_device_list_is_checked() -> None:
    assert plan_devices(["cpu", "cpu"], 0).devices == ["cpu", "cpu"]
    assert plan_devices(["cuda:1", "cuda"], 2).devices == ["cuda:1", "cuda:0"]
    for spec, gpus, message in ((["cuda:2"], 2, "not visible"), (["gpu0"], 1, "unknown device"),
                                (["all", "cpu"], 1, "cannot be combined"), ([" "], 1, "names no device")):
        with pytest.raises(DeviceSpecError, match=message):
            plan_devices(spec, gpus)


def test_each_worker_is_named_for_its_device() -> None:
    assert worker_names("box", ["cuda:0", "cuda:1"]) == ["box-cuda0", "box-cuda1"]
    assert worker_names("box", ["cpu", "cpu"]) == ["box-cpu0", "box-cpu1"]


def test_auto_on_a_multi_gpu_host_says_which_gpu_and_how_to_use_all() -> None:
    note = auto_device_note("auto", 4)
    assert note is not None and "cuda:0 only, of 4 visible GPUs" in note and "--devices all" in note
    assert auto_device_note("auto", 1) is None and auto_device_note("cuda:2", 4) is None


def test_an_unknown_device_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["worker", "--model-kind", "sim", "--devices", "tpu:0,cpu"])
    assert exit_.value.code == 2 and "unknown device 'tpu:0'" in capsys.readouterr().err


# --- supervision, for real ------------------------------------------------------------------------


def _start(stack: Any, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], Path, Path]:
    log_path, metrics = tmp_path / "parent.log", tmp_path / "batches.jsonl"
    env = {
        **os.environ,
        "AMI_ANTENNA_API_URL": stack.api_url,
        "AMI_ANTENNA_API_TOKEN": stack.token,
        "AMI_NATS_URL": stack.nats_url,
        "AMI_MODEL_KIND": "sim",
        "AMI_SIM_SECONDS_PER_IMAGE": "0.02",
        "AMI_DISCOVERY_INTERVAL_S": "0.2",
        "AMI_METRICS_FILE": str(metrics),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "antenna_flows.cli", "worker", "--orchestration", "plain", "--devices", "cpu,cpu",
         "--worker-name", "dw", "--pipelines", PIPELINE, *extra],
        env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, text=True,
    )
    return proc, log_path, metrics


def _wait(what: str, check: Callable[[], Any], timeout: float, proc: subprocess.Popen[str], log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert proc.poll() is None, f"parent exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _children(log: Path) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"worker (dw-cpu\d) on cpu: pid (\d+)", log.read_text())}


def _batch_workers(metrics: Path) -> set[str]:
    if not metrics.exists():
        return set()
    names = set()
    for line in metrics.read_text().splitlines():
        try:
            names.add(json.loads(line)["worker"])
        except (ValueError, KeyError):
            pass
    return names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_two_cpu_workers_serve_and_stop_on_sigterm(stack_factory, tmp_path: Path) -> None:
    stack = stack_factory(ack_wait_s=10.0)
    stack.create_job(PIPELINE, 3000, job_id=81)  # ~30 s of work for two workers: in flight when stopped
    proc, log, metrics = _start(stack, tmp_path)
    try:
        children = _wait("two children", lambda: len(_children(log)) == 2 and _children(log), 30, proc, log)
        _wait("batches from both workers", lambda: _batch_workers(metrics) >= {"dw-cpu0", "dw-cpu1"}, 60, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "--devices cpu,cpu: one worker each" in text
    assert "SIGTERM: stopping 2 worker(s)" in text
    assert all(f"worker {name} on cpu exited 0" in text for name in children)
    assert not any(_alive(pid) for pid in children.values())
    job = stack.store.job(81)
    assert 0 < job.results < 3000 and job.duplicates == 0


@pytest.mark.slow
def test_a_failed_worker_stops_the_others_and_the_command_fails(stack_factory, tmp_path: Path) -> None:
    stack = stack_factory(ack_wait_s=10.0)
    stack.create_job(PIPELINE, 3000, job_id=82)
    proc, log, metrics = _start(stack, tmp_path)
    try:
        children = _wait("two children", lambda: len(_children(log)) == 2 and _children(log), 30, proc, log)
        _wait("batches from both workers", lambda: _batch_workers(metrics) >= {"dw-cpu0", "dw-cpu1"}, 60, proc, log)
        os.kill(children["dw-cpu1"], signal.SIGKILL)
        assert proc.wait(30) == 128 + signal.SIGKILL, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "worker dw-cpu1 on cpu exited with signal SIGKILL" in text
    assert "stopping the other workers (dw-cpu0)" in text and "worker dw-cpu0 on cpu exited 0" in text
    assert not _alive(children["dw-cpu0"])


@pytest.mark.slow
def test_a_killed_parent_leaves_no_worker_behind(stack_factory, tmp_path: Path) -> None:
    """SIGKILL of the command (a service manager's last resort): the kernel SIGTERMs its children,
    which stop gracefully instead of serving on as orphans."""
    stack = stack_factory(ack_wait_s=10.0)
    stack.create_job(PIPELINE, 3000, job_id=84)
    proc, log, metrics = _start(stack, tmp_path)
    try:
        children = _wait("two children", lambda: len(_children(log)) == 2 and _children(log), 30, proc, log)
        _wait("batches from both workers", lambda: _batch_workers(metrics) >= {"dw-cpu0", "dw-cpu1"}, 60, proc, log)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in children.values()), log.read_text()[-3000:]
    finally:
        for pid in _children(log).values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert log.read_text().count("stopping (SIGTERM)") == 2  # each child stopped gracefully
    assert stack.store.job(84).duplicates == 0


def test_devices_all_without_a_gpu_runs_one_cpu_worker(stack, caplog: pytest.LogCaptureFixture) -> None:
    """No GPU here: `--devices all` says so and runs one (CPU) worker in this process."""
    job = stack.create_job(PIPELINE, 5, job_id=83)
    gpus = visible_gpus()
    with caplog.at_level(logging.INFO, logger="antenna_flows.cli"):
        code = main(["worker", "--orchestration", "plain", "--model-kind", "sim", "--devices", "all",
                     "--pipelines", PIPELINE, "--job-ids", str(job.id), "--exit-when-done",
                     "--antenna-api-url", stack.api_url, "--antenna-api-token", stack.token,
                     "--nats-url", stack.nats_url, "--sim-seconds-per-image", "0.005", "--discovery-interval-s", "0.2"])
    assert code == 0
    if gpus == 0:
        assert "no GPU is visible on this host, so one CPU worker" in caplog.text
    else:  # a GPU host: one worker per GPU (sim on each), all stopped when the job is done
        assert f"{gpus} visible GPU(s), one worker each" in caplog.text
    assert stack.store.job(83).results == 5
