"""The self-healing fleet, end to end, as an operator runs it.

A real ``prefect server start`` on a free port (its own PREFECT_HOME), the pools made by
deployments/setup-pools.sh, ``prefect --no-prompt deploy --all`` of prefect.yaml, a
``prefect worker start --pool cpu-pool`` process, a local stack with one long job, and a fleet spec
of one sim slot. The keeper starts the slot's fair-worker run; the test SIGKILLs that run's process
and expects a replacement run serving the job (new results posted) within 60 s, without any help.

Also here: an ad-hoc ``process-jobs`` run. The keeper's pass on its own: tests/test_fleet_keeper.py;
the fleet spec: tests/test_fleet_spec.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

import antenna_flows.prefect_env  # noqa: F401 - before prefect

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
PIPELINE = "sim-panama_moths_2024"  # the sim model serves pipelines of its own
REPLACEMENT_DEADLINE_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def real_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real Prefect server (SQLite) on a free port; yields the environment for prefect commands."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_KEY", None)
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home,
    )

    def healthy() -> bool:
        assert server.poll() is None, f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 120, "prefect server health")
        yield env
    finally:
        stop(server)
        log.close()


def prefect(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def api_json(env: dict[str, str], method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(method, env["PREFECT_API_URL"] + path, json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def slot_runs(env: dict[str, str], slot: str) -> list[dict[str, Any]]:
    """Every flow run of the slot (any state), oldest first, straight from the REST API."""
    runs = api_json(env, "POST", "/flow_runs/filter", {
        "flow_runs": {"tags": {"all_": ["fleet", f"fleet-slot:{slot}"]}},
        "sort": "EXPECTED_START_TIME_ASC",
        "limit": 50,
    })
    return sorted(runs, key=lambda r: r["created"])


def job(stack: Any, job_id: int) -> dict[str, Any]:
    response = httpx.get(f"{stack.api_url}/jobs/{job_id}/", headers={"Authorization": f"Token {stack.token}"}, timeout=10)
    response.raise_for_status()
    return response.json()


@pytest.mark.slow
def test_killed_worker_run_is_replaced_and_serving_within_60_s(real_prefect_server, stack_factory, tmp_path):
    env = real_prefect_server
    stack = stack_factory(ack_wait_s=10.0, max_deliver=5)
    stack.create_job(PIPELINE, 4000, job_id=901)  # ~8 min of sim work at 0.1 s/image: the job outlives the test

    out = subprocess.run([str(ROOT / "deployments" / "setup-pools.sh")], env={**env, "PREFECT": PREFECT},
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gpu-pool" in out.stdout and "cpu-pool" in out.stdout
    prefect(env, "--no-prompt", "deploy", "--all")
    names = {d["name"] for d in api_json(env, "POST", "/deployments/filter", {})}
    assert {"gpu-worker", "sim-worker", "fleet-keeper", "queue-report", "gpu", "sim"} <= names, names

    spec = tmp_path / "fleet.yaml"
    spec.write_text(
        "deployment: fair-worker/sim-worker\n"
        "hosts:\n"
        "  - name: test\n"
        "    gpus: 1\n"
        "    parameters: {device: cpu, max_runtime_s: 600, settings_overrides: "
        "{sim_seconds_per_image: 0.1, sim_seconds_per_batch: 0.01, discovery_interval_s: 0.5}}\n"
    )
    worker_env = {
        **env,
        "ANTENNA_FLOWS_HOME": str(ROOT),
        "ANTENNA_FLEET_SPEC": str(spec),
        "AMI_ANTENNA_API_URL": stack.api_url,
        "AMI_ANTENNA_API_TOKEN": stack.token,
        "AMI_NATS_URL": stack.nats_url,
        "AMI_MODEL_KIND": "sim",
        "PREFECT_WORKER_QUERY_SECONDS": "5",
    }
    log_path = tmp_path / "worker.log"
    log = open(log_path, "w")
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu-pool", "--name", "test-cpu-worker"],
                              env=worker_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    pids: set[int] = set()
    try:
        prefect(env, "deployment", "run", "fleet-keeper/fleet-keeper")  # don't wait for the 30 s schedule

        def running_run() -> dict[str, Any] | None:
            assert worker.poll() is None, f"prefect worker exited:\n{log_path.read_text()[-3000:]}"
            runs = [r for r in slot_runs(env, "test-gpu0") if r["state_type"] == "RUNNING" and r["infrastructure_pid"]]
            return runs[-1] if runs else None

        first = wait_until(running_run, 180, "the keeper's first fair-worker run to be Running")
        wait_until(lambda: job(stack, 901)["results"] > 0, 60, "the first run to post results")
        assert len([r for r in slot_runs(env, "test-gpu0") if r["state_type"] in ("RUNNING", "PENDING", "SCHEDULED")]) == 1
        pid = int(str(first["infrastructure_pid"]).rsplit(":", 1)[-1])
        pids.add(pid)

        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()

        def replacement() -> dict[str, Any] | None:
            runs = [r for r in slot_runs(env, "test-gpu0") if r["id"] != first["id"]]
            alive = [r for r in runs if r["state_type"] == "RUNNING"]
            return alive[-1] if alive else None

        second = wait_until(replacement, REPLACEMENT_DEADLINE_S, "a replacement run of slot test-gpu0 to be Running")
        if second.get("infrastructure_pid"):
            pids.add(int(str(second["infrastructure_pid"]).rsplit(":", 1)[-1]))
        results_then = job(stack, 901)["results"]
        left = REPLACEMENT_DEADLINE_S - (time.monotonic() - killed_at)
        wait_until(lambda: job(stack, 901)["results"] > results_then, max(left, 1.0),
                   "the replacement run to post results (serving)")
        took = time.monotonic() - killed_at
        dead = api_json(env, "GET", f"/flow_runs/{first['id']}")
        assert dead["state_type"] == "CRASHED", dead["state"]
        orphans = api_json(env, "POST", "/flow_runs/filter", {"flow_runs": {
            "parent_flow_run_id": {"any_": [first["id"]]}, "state": {"type": {"any_": ["RUNNING", "PENDING"]}}}})
        assert orphans == [], [(r["name"], r["state_name"]) for r in orphans]  # its sessions: Crashed too
        print(f"\nreplacement serving {took:.1f} s after SIGKILL (run {second['name']})")
        assert took < REPLACEMENT_DEADLINE_S
        # One GPU, one run: exactly one live run of the slot.
        live = [r for r in slot_runs(env, "test-gpu0") if r["state_type"] in ("RUNNING", "PENDING")]
        assert len(live) == 1, [(r["name"], r["state_name"]) for r in live]
        queue = api_json(env, "GET", "/work_pools/cpu-pool/queues/test-gpu0")
        assert queue["concurrency_limit"] == 1
    finally:
        stop(worker, grace=15)
        for run in slot_runs(env, "test-gpu0"):
            if run.get("infrastructure_pid"):
                pids.add(int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1]))
        for pid in pids:  # flow-run processes run in sessions of their own: stop ours by id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


# --- ad-hoc runs ---------------------------------------------------------------------------------


@pytest.mark.prefect
async def test_process_jobs_serves_only_the_named_jobs_and_exits_when_they_are_done(prefect_server, stack, monkeypatch):
    from antenna_flows.flows.process_jobs import process_jobs

    monkeypatch.setenv("AMI_ANTENNA_API_TOKEN", stack.token)
    named = [stack.create_job(PIPELINE, n, job_id=j) for j, n in ((611, 12), (612, 5))]
    other = stack.create_job(PIPELINE, 7, job_id=613)
    started = time.monotonic()
    totals = await process_jobs(
        job_ids=[612, 611],
        model_kind="sim",
        antenna_api_url=stack.api_url,
        nats_url=stack.nats_url,
        max_runtime_s=60,
        settings_overrides=dict(sim_seconds_per_image=0.005, sim_seconds_per_batch=0.005, discovery_interval_s=0.2,
                                session_idle_s=0.5, max_batch_size=4),
    )
    assert time.monotonic() - started < 45, "process-jobs did not exit when its jobs were done"
    assert totals["images"] == 17, totals
    assert [job(stack, j.id)["status"] for j in named] == ["SUCCESS", "SUCCESS"]
    untouched = job(stack, other.id)
    assert (untouched["results"], untouched["ack_pending"], untouched["pending"]) == (0, 0, 7), untouched
