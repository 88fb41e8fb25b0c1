"""``antenna-flows worker`` as an operator runs it: a real process, a real SIGTERM, the exit code.

A supervisor (supervisord's ``stopasgroup``, ``timeout --signal=SIGTERM``, SLURM) signals the
worker's whole process group. Under either orchestration, and under Prefect with no
``PREFECT_API_URL`` (a temporary Prefect server, which used to die with the group before the
worker's final report), the worker must finish the batch in flight, post it, hand the rest back,
print its final report and exit 0. Nothing it held is lost: another worker answers the rest, with
no duplicate. And when Prefect cannot be reached, the error says Prefect and its URL.
(``tests/test_devices.py`` covers the same for ``--devices``, one worker process per device.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from antenna_lab.antenna.admin import AsyncAntennaAdmin
from antenna_flows.models import load_model
from antenna_flows.settings import WorkerSettings
from antenna_flows.worker import FairWorker

PIPELINE = "sim-panama_moths_2024"  # the sim model serves pipelines of its own
ANTENNA_FLOWS = str(Path(sys.executable).parent / "antenna-flows")


def worker_args(stack: Any, name: str, orchestration: str) -> list[str]:
    return [ANTENNA_FLOWS, "worker", "--orchestration", orchestration, "--worker-name", name,
            "--antenna-api-url", stack.api_url, "--antenna-api-token", stack.token, "--nats-url", stack.nats_url,
            "--model-kind", "sim", "--pipelines", PIPELINE, "--sim-seconds-per-image", "0.02",
            "--sim-seconds-per-batch", "0.005", "--max-batch-size", "4", "--discovery-interval-s", "0.2",
            "--session-idle-s", "0.5", "--release-delay-s", "0.2", "--max-runtime-s", "300"]


def worker_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AMI_"))}
    env.update(PREFECT_HOME=str(home), **extra)  # a fresh Prefect home: no profile, no API URL
    return env


async def finish_plainly(stack: Any, job_id: int) -> None:
    """What a stopped worker handed back, another worker (plain, in-process) answers."""
    settings = WorkerSettings(worker_name="cleanup", antenna_api_url=stack.api_url, antenna_api_token=stack.token,
                              nats_url=stack.nats_url, model_kind="sim", pipelines=[PIPELINE], job_ids=[job_id],
                              exit_when_done=True, max_runtime_s=120, sim_seconds_per_image=0.005,
                              sim_seconds_per_batch=0.005, discovery_interval_s=0.2, max_batch_size=8)
    await FairWorker(settings, load_model(settings)).run()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("orchestration", ["plain", "prefect"])
async def test_sigterm_to_the_process_group_exits_0_after_the_final_report(orchestration, stack, tmp_path):
    job = stack.create_job(PIPELINE, 400, job_id=801 if orchestration == "plain" else 802)
    name = f"sigterm-{orchestration}"
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(worker_args(stack, name, orchestration), env=worker_env(tmp_path / "prefect"),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async with AsyncAntennaAdmin(stack.api_url, stack.token) as admin:
            deadline = time.monotonic() + 150
            while (await admin.job(job.id)).results < 20:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no results from the worker:\n" + log_path.read_text()[-3000:]
                await asyncio.sleep(0.2)
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a supervisor does
            rc = await asyncio.to_thread(proc.wait, 90)
            output = log_path.read_text()
            assert rc == 0, output[-4000:]
            assert f"worker {name} stopped: " in output, output[-4000:]  # the final report
            stopped = output.split(f"worker {name} stopped: ", 1)[1].splitlines()[0]
            assert "'images': " in stopped, stopped
            if orchestration == "prefect":
                assert "Finished in state Completed()" in output, output[-4000:]
                assert "ConnectError" not in output and "Connect call failed" not in output, output[-4000:]
                assert "Crash" not in output, output[-4000:]
                assert "temporary Prefect server" in output, output[-4000:]  # ours, not Prefect's own
            held = await admin.job(job.id)
            assert 20 <= held.results < 400, held

            await finish_plainly(stack, job.id)
            done = await admin.job(job.id)
        assert (done.results, done.errors, done.duplicates, done.dead_lettered) == (400, 0, 0, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_an_unreachable_prefect_is_named_with_its_url(stack, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    done = subprocess.run(worker_args(stack, "no-prefect", "prefect"), capture_output=True, text=True, timeout=120,
                          env=worker_env(tmp_path / "prefect", PREFECT_API_URL=url))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"error: cannot reach the Prefect API at {url}" in done.stderr, done.stderr[-2000:]
    assert "Antenna" not in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr  # one line, Prefect's
