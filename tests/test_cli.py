"""The CLI: every setting is an option, and submit/jobs/devstack work against a live stack."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from antenna_lab.antenna.models import Job
from antenna_flows.cli import add_settings_arguments, build_parser, main, settings_from_args
from antenna_lab.cli import format_jobs_table
from antenna_lab.antenna.devstack import DevStack
from antenna_flows.settings import WorkerSettings
from antenna_lab.settings import ApiSettings, QueueSettings


@pytest.mark.parametrize("settings_cls", [QueueSettings, ApiSettings, WorkerSettings])
def test_every_setting_is_an_option_with_its_help(settings_cls) -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, settings_cls)
    text = " ".join(parser.format_help().split())
    for name, field in settings_cls.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text, name
        assert f"env AMI_{name.upper()}" in text, name
        assert " ".join((field.description or "").split())[:40] in text, name


def test_options_override_environment_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMI_NATS_TASK_TTR", "7")
    monkeypatch.setenv("AMI_NATS_MAX_DELIVER", "3")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, QueueSettings)
    add_settings_arguments(parser, WorkerSettings)  # shares nats_url with QueueSettings: one option
    args = parser.parse_args(
        ["--nats-task-ttr", "9.5", "--nats-url", "nats://h:1", "--pipelines", "a,b", "--allow-weight-download",
         "--model-kind", "sim"]
    )
    queue = settings_from_args(QueueSettings, args)
    assert (queue.nats_task_ttr, queue.nats_max_deliver, queue.nats_max_ack_pending) == (9.5, 3, 1000)
    worker = settings_from_args(WorkerSettings, args)
    assert (worker.nats_url, worker.pipelines, worker.allow_weight_download, worker.model_kind) == (
        "nats://h:1", ["a", "b"], True, "sim"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-kind", "gpu"])


def test_invalid_setting_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["devstack", "--nats-max-deliver", "0"])
    assert exit_.value.code == 2
    assert "--nats-max-deliver" in capsys.readouterr().err


def test_jobs_table_lines_up() -> None:
    base = dict(name="j", project_id=1, dispatch_mode="async_api", ack_wait_s=30, max_deliver=2, created_at=0)
    jobs = [
        Job(id=202, pipeline_slug="panama_moths_2024", status="STARTED", total=10, messages=10, ack_pending=8,
            redelivered=8, redeliveries=8, **base),
        Job(id=3, pipeline_slug="moth_binary", status="SUCCESS", priority=5, total=500, results=498, errors=2, **base),
    ]
    lines = format_jobs_table(jobs).splitlines()
    assert lines[0].split() == ["id", "pipeline", "priority", "status", "msgs", "pending", "ack_pending", "redelivered",
                                "redeliveries", "results", "errors", "duplicates", "total"]
    assert lines[1].split() == ["202", "panama_moths_2024", "0", "STARTED", "10", "0", "8", "8", "8", "0", "0", "0", "10"]
    assert len({line.index("STARTED") if "STARTED" in line else line.index("SUCCESS") for line in lines[1:]}) == 1


def test_submit_and_jobs_against_a_stack(stack: DevStack, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    client = ["--api-url", stack.api_url, "--token", stack.token]
    assert main(["submit", *client, "-n", "12", "--missing", "1", "--corrupt", "1", "--priority", "4"]) == 0
    assert capsys.readouterr().out.strip() == "job 1 STARTED: 12 images, pipeline panama_moths_2024, priority 4"
    urls = tmp_path / "urls.txt"
    urls.write_text(f"# two frames\n{stack.base_url}/images/demo/64x48/a.jpg\n\n{stack.base_url}/images/missing/b.jpg\n")
    assert main(["submit", *client, "--urls-file", str(urls), "--pipeline", "moth_binary", "--job-id", "40"]) == 0
    assert stack.store.job(1).priority == 4
    assert sum("/corrupt/" in i.url for i in stack.store.images(1)) == 1
    assert [i.url.rsplit("/", 1)[1] for i in stack.store.images(40)] == ["a.jpg", "b.jpg"]
    capsys.readouterr()

    assert main(["jobs", *client]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [(r[0], r[1], r[2], r[3], r[-1]) for r in rows[1:]] == [
        ("1", "panama_moths_2024", "4", "STARTED", "12"),
        ("40", "moth_binary", "0", "STARTED", "2"),
    ]
    assert main(["submit", *client, "--job-id", "40"]) == 1  # the API's 400, reported
    assert "already exists" in capsys.readouterr().err
    assert main(["jobs", "--api-url", stack.api_url, "--token", "nope"]) == 1
    assert "401" in capsys.readouterr().err


def test_jobs_without_an_api_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["jobs", "--api-url", "http://127.0.0.1:9/api/v2"]) == 1
    assert "antenna-flows devstack" in capsys.readouterr().err


def test_devstack_command_serves_until_terminated(tmp_path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "antenna_flows.cli", "devstack", "--api-port", "0", "--nats-port", "0",
         "--data-dir", str(tmp_path), "--api-token", "cli-token"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        banner: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while "NATS" not in banner:
            assert time.monotonic() < deadline and proc.poll() is None, "devstack did not come up"
            words = proc.stdout.readline().split()
            if len(words) >= 2 and words[0] in ("API", "token", "NATS"):
                banner[words[0]] = words[1]
        assert banner["token"] == "cli-token" and banner["NATS"].startswith("nats://127.0.0.1:")
        response = httpx.get(f"{banner['API']}/jobs/", headers={"Authorization": "Token cli-token"})
        assert response.status_code == 200 and response.json()["count"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "antenna.sqlite3").exists() and (tmp_path / "nats").is_dir()


def test_help_lists_the_commands() -> None:
    text = build_parser().format_help()
    for command in ("devstack", "submit", "jobs"):
        assert command in text


def test_register_prints_a_short_summary(capsys: pytest.CaptureFixture[str]) -> None:
    with DevStack(register_kinds=()) as stack:
        code = main(["register", "--project", "3", "--model-kind", "sim", "--pipeline", "moth_binary",
                     "--pipeline", "panama_moths_2024", "--antenna-api-url", stack.api_url,
                     "--antenna-api-token", stack.token])
        out = capsys.readouterr().out
        assert code == 0
        assert "pipelines created (2): sim-moth_binary, sim-panama_moths_2024" in out
        assert "algorithms created (2): sim-detector, sim-classifier" in out
        assert "1 registered, 0 skipped, 0 failed" in out
        assert len(out) < 1000
        assert stack.store.algorithm_keys(3, "sim-moth_binary") == {"sim-detector", "sim-classifier"}
        assert stack.store.algorithm_keys(3, "moth_binary") == set()  # sim never touches a real pipeline
        assert main(["register", "--project", "3", "--model-kind", "sim", "--pipelines", "moth_binary",
                     "--antenna-api-url", stack.api_url, "--antenna-api-token", stack.token]) == 0
        assert "pipelines updated (1): sim-moth_binary" in capsys.readouterr().out


def test_register_takes_the_model_kind_and_service_name_from_the_environment(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMI_MODEL_KIND", "sim")
    monkeypatch.setenv("AMI_ANTENNA_SERVICE_NAME", "DRAC Worker")
    with DevStack(register_kinds=()) as stack:
        assert main(["register", "--project", "4", "--pipeline", "moth_binary", "--api-url", stack.api_url,
                     "--token", stack.token]) == 0
        out = capsys.readouterr().out
        assert "model kind sim" in out and "'DRAC Worker (" in out
        assert stack.store.algorithm_keys(4, "sim-moth_binary") == {"sim-detector", "sim-classifier"}


def test_register_with_no_project_registers_with_every_accessible_one(
    stack_factory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As upstream's `ami worker register`: the token's projects from GET /projects/, upstream's settings only."""
    stack = stack_factory(register_kinds=())
    stack.store.ensure_project(8, "Barro Colorado")
    monkeypatch.setenv("AMI_ANTENNA_API_BASE_URL", stack.api_url)
    monkeypatch.setenv("AMI_ANTENNA_API_AUTH_TOKEN", stack.token)
    assert main(["register", "--model-kind", "sim", "--pipeline", "panama_moths_2024"]) == 0
    out = capsys.readouterr().out
    assert "project 1 (Default project): registered" in out and "project 8 (Barro Colorado): registered" in out
    assert stack.store.algorithm_keys(8, "sim-panama_moths_2024") == {"sim-detector", "sim-classifier"}
    assert main(["register", "--model-kind", "sim", "--token", "wrong"]) == 1
    assert "401" in capsys.readouterr().err


def test_no_option_is_abbreviated() -> None:
    """argparse would read --pipeline as --pipelines (a prefix) and keep only the last one."""
    parser = build_parser()
    args = parser.parse_args(["worker", "--pipeline", "sim-a", "--pipeline", "sim-b", "--pipelines", "sim-c"])
    assert args.pipeline_list == ["sim-a", "sim-b"] and args.pipelines == "sim-c"
    for abbreviated in (["worker", "--pipelin", "x"], ["worker", "--model", "sim"], ["register", "--proj", "1"],
                        ["jobs", "--api", "http://127.0.0.1:9/api/v2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(abbreviated)


def test_repeated_pipeline_serves_every_one(stack, capsys: pytest.CaptureFixture[str]) -> None:
    """`worker --pipeline a --pipeline b` (upstream's habit) serves both, not only b."""
    a = stack.create_job("sim-panama_moths_2024", 6, job_id=71)
    b = stack.create_job("sim-moth_binary", 5, job_id=72)
    code = main(["worker", "--orchestration", "plain", "--model-kind", "sim", "--pipeline", "sim-panama_moths_2024",
                 "--pipeline", "sim-moth_binary", "--job-ids", f"{a.id},{b.id}", "--exit-when-done",
                 "--antenna-api-url", stack.api_url, "--antenna-api-token", stack.token, "--nats-url", stack.nats_url,
                 "--sim-seconds-per-image", "0.005", "--discovery-interval-s", "0.2", "--worker-name", "repeat"])
    assert code == 0
    for job_id, total in ((71, 6), (72, 5)):
        job = stack.store.job(job_id)
        assert (job.results, job.duplicates, job.total) == (total, 0, total)


def test_worker_register_registers_before_serving_and_a_failure_stops_it(
    stack_factory, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = stack_factory(register_kinds=())
    job = stack.create_job("sim-moth_binary", 4, job_id=73)
    common = ["worker", "--orchestration", "plain", "--model-kind", "sim", "--pipelines", "sim-moth_binary",
              "--antenna-api-url", stack.api_url, "--nats-url", stack.nats_url, "--register", "--project", "1"]
    assert main([*common, "--antenna-api-token", "wrong"]) == 1
    err = capsys.readouterr().err
    assert "registration failed, not serving" in err and "401" in err
    assert stack.store.job(73).results == 0
    assert main([*common, "--antenna-api-token", stack.token, "--job-ids", str(job.id), "--exit-when-done",
                 "--sim-seconds-per-image", "0.005", "--discovery-interval-s", "0.2"]) == 0
    assert stack.store.algorithm_keys(1, "sim-moth_binary") == {"sim-detector", "sim-classifier"}
    assert stack.store.job(73).results == 4


def test_a_sim_worker_refuses_a_real_pipeline(stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--orchestration", "plain", "--model-kind", "sim", "--pipelines", "panama_moths_2024",
                 "--antenna-api-url", stack.api_url, "--antenna-api-token", stack.token,
                 "--nats-url", stack.nats_url]) == 1
    assert "did you mean sim-panama_moths_2024" in capsys.readouterr().err


def test_cannot_reach_names_the_service_and_its_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = "http://127.0.0.1:9"
    assert main(["register", "--project", "1", "--model-kind", "sim", "--api-url", f"{closed}/api/v2"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach Antenna at {closed}/api/v2" in err and "antenna-flows devstack" in err

    from antenna_flows.cli import cannot_reach

    monkeypatch.setenv("PREFECT_API_URL", f"{closed}/api")
    with pytest.raises(httpx.ConnectError) as refused:
        httpx.get(f"{closed}/api/flow_runs/filter")
    message = cannot_reach(refused.value, {"Antenna": "http://127.0.0.1:8000/api/v2", "NATS": None})
    assert message.startswith(f"cannot reach the Prefect API at {closed}/api") and "--orchestration plain" in message


def test_a_worker_given_only_upstream_settings_serves_over_rest(
    stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An `ami worker` operator's environment, no NATS URL, no --transport: Antenna's REST API."""
    for name in list(os.environ):
        if name.upper().startswith("AMI_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AMI_ANTENNA_API_BASE_URL", stack.api_url)
    monkeypatch.setenv("AMI_ANTENNA_API_AUTH_TOKEN", stack.token)
    monkeypatch.setenv("AMI_ANTENNA_API_BATCH_SIZE", "4")
    monkeypatch.setenv("AMI_NUM_WORKERS", "2")
    job = stack.create_job("sim-moth_binary", 9, job_id=74)
    with caplog.at_level("INFO"):
        assert main(["worker", "--orchestration", "plain", "--model-kind", "sim", "--pipeline", "sim-moth_binary",
                     "--job-ids", str(job.id), "--exit-when-done", "--sim-seconds-per-image", "0.005",
                     "--discovery-interval-s", "0.2", "--rest-ack-wait-s", "2"]) == 0
    assert "AMI_NUM_WORKERS (upstream setting) is not read" in caplog.text
    assert "no NATS URL configured" in caplog.text and "via rest" in caplog.text
    done = stack.store.job(74)
    assert (done.results, done.duplicates) == (9, 0)


def test_service_unreachable_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from antenna_flows import cli
    from antenna_flows.unreachable import ServiceUnreachable

    def worker_that_cannot_reach_nats(args):
        raise ServiceUnreachable("NATS", "nats://10.0.0.9:4222", "no server answered within 10 s")

    monkeypatch.setattr(cli, "run_worker_command", worker_that_cannot_reach_nats)
    assert main(["worker", "--model-kind", "sim"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: cannot reach NATS at nats://10.0.0.9:4222 (no server answered within 10 s)")


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--help"], ["demo", "--workers", "2"]])
def test_a_lab_command_on_a_product_only_install_says_how_to_install_the_lab(argv, capsys):
    """Without the lab (its commands not registered), each lab command, whatever its options, answers
    with how to install it and exits 2, rather than an argparse complaint about its options."""
    from antenna_flows.cli import LAB_INSTALL, Parser, add_missing_lab_commands, run_command

    parser = Parser(prog="antenna-flows")
    parser.add_argument("--log-level", default="INFO")
    add_missing_lab_commands(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    assert run_command(parser, argv) == 2
    err = capsys.readouterr().err
    assert f"`antenna-flows {argv[0]}` is a lab command and the lab is not installed" in err and LAB_INSTALL in err
