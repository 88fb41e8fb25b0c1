"""Settings an upstream (`ami worker`) operator already has reach the worker; the dev token stays home.

Pure settings logic (environment and a real .env file in a temporary working directory), plus the
CLI's answer to a worker aimed at a remote Antenna without a token.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from antenna_flows.cli import add_settings_arguments, main
from antenna_flows.settings import (
    DEFAULT_TOKEN,
    UPSTREAM_UNUSED,
    AntennaSettings,
    HostSettings,
    WorkerSettings,
    is_local_url,
    upstream_notes,
)

REMOTE = "https://antenna.example.org/api/v2"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AMI_* from the machine, and a working directory of our own (where .env is read)."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("AMI_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_upstream_names_in_the_environment_reach_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMI_ANTENNA_API_BASE_URL", REMOTE)
    monkeypatch.setenv("AMI_ANTENNA_API_AUTH_TOKEN", "upstream-token")
    monkeypatch.setenv("AMI_ANTENNA_SERVICE_NAME", "DRAC Worker")
    monkeypatch.setenv("AMI_ANTENNA_API_BATCH_SIZE", "16")
    s = WorkerSettings()
    assert (s.antenna_api_url, s.antenna_api_token, s.antenna_service_name, s.antenna_api_batch_size) == (
        REMOTE, "upstream-token", "DRAC Worker", 16)
    assert s.max_batch_size == 8  # 16 is above the GPU batch: unchanged


def test_upstream_dotenv_reaches_the_worker(clean_env: Path) -> None:
    """An upstream operator's .env (as in ADC's .env.example and SLURM script), unchanged."""
    (clean_env / ".env").write_text(
        "AMI_NUM_WORKERS=1\n"
        f"AMI_ANTENNA_API_BASE_URL={REMOTE}\n"
        "AMI_ANTENNA_API_AUTH_TOKEN=your_antenna_auth_token_here\n"
        "AMI_ANTENNA_API_BATCH_SIZE=4\n"
        'AMI_ANTENNA_SERVICE_NAME="AMI Data Companion"\n'
    )
    s = WorkerSettings()
    assert (s.antenna_api_url, s.antenna_api_token) == (REMOTE, "your_antenna_auth_token_here")
    assert s.antenna_service_name == "AMI Data Companion"
    # upstream's GPU batch is its API batch: a host that set 4 for its GPU memory keeps 4
    assert (s.antenna_api_batch_size, s.max_batch_size) == (4, 4)
    assert WorkerSettings(max_batch_size=12).max_batch_size == 12  # an explicit GPU batch wins
    notes = upstream_notes()
    assert len(notes) == 1 and notes[0].startswith("AMI_NUM_WORKERS (upstream setting) is not read")
    assert "--devices all" in notes[0]


def test_ours_wins_within_a_source_and_the_environment_beats_dotenv(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    monkeypatch.setenv("AMI_ANTENNA_API_URL", "http://127.0.0.1:8010/api/v2")
    monkeypatch.setenv("AMI_ANTENNA_API_BASE_URL", REMOTE)
    assert WorkerSettings().antenna_api_url == "http://127.0.0.1:8010/api/v2"
    [note] = upstream_notes()
    assert note.startswith("AMI_ANTENNA_API_URL in environment (http://127.0.0.1:8010/api/v2) is used")
    assert "AMI_ANTENNA_API_BASE_URL in environment differs" in note

    monkeypatch.delenv("AMI_ANTENNA_API_URL")
    (clean_env / ".env").write_text("AMI_ANTENNA_API_URL=http://localhost:9000/api/v2\nAMI_ANTENNA_API_AUTH_TOKEN=t\n")
    assert WorkerSettings().antenna_api_url == REMOTE  # the process environment beats .env, whatever the name
    assert upstream_notes()[0].startswith(f"AMI_ANTENNA_API_BASE_URL in environment ({REMOTE}) is used")
    # a token is never shown in a note
    monkeypatch.setenv("AMI_ANTENNA_API_TOKEN", "secret-one")
    monkeypatch.setenv("AMI_ANTENNA_API_AUTH_TOKEN", "secret-two")
    assert WorkerSettings().antenna_api_token == "secret-one"
    assert not any("secret" in note for note in upstream_notes())


def test_every_unused_upstream_setting_is_explained() -> None:
    environ = {name: "x" for name in UPSTREAM_UNUSED}
    notes = upstream_notes(environ, env_file=None)
    assert len(notes) == len(UPSTREAM_UNUSED)
    assert all("is not read: " in note for note in notes)
    assert upstream_notes({"AMI_MODEL_KIND": "sim", "AMI_DEVICE": "cpu"}, env_file=None) == []


@pytest.mark.parametrize("url,local", [
    ("http://127.0.0.1:8000/api/v2", True), ("http://localhost/api/v2", True), ("http://[::1]:8000/api/v2", True),
    ("http://127.0.1.1:8000/api/v2", True), (REMOTE, False), ("http://10.0.0.5:8000/api/v2", False),
    ("http://localhost.example.org/api/v2", False),
])
def test_local_means_this_machine(url: str, local: bool) -> None:
    assert is_local_url(url) is local


def test_the_dev_token_is_only_for_a_local_antenna(monkeypatch: pytest.MonkeyPatch) -> None:
    assert AntennaSettings().antenna_api_token == DEFAULT_TOKEN
    assert WorkerSettings(antenna_api_url="http://localhost:8000/api/v2").antenna_api_token == DEFAULT_TOKEN
    with pytest.raises(ValueError, match="not on this machine and no API token is configured"):
        WorkerSettings(antenna_api_url=REMOTE)
    monkeypatch.setenv("AMI_ANTENNA_API_AUTH_TOKEN", "  ")  # an empty upstream token is no token
    with pytest.raises(ValueError, match="AMI_ANTENNA_API_AUTH_TOKEN"):
        WorkerSettings(antenna_api_url=REMOTE)
    assert WorkerSettings(antenna_api_url=REMOTE, antenna_api_token="real").antenna_api_token == "real"


@pytest.mark.parametrize("command", [["worker", "--model-kind", "sim"], ["register", "--project", "1"],
                                     ["worker", "--model-kind", "sim", "--devices", "cpu,cpu"]])
def test_a_worker_aimed_at_a_remote_antenna_without_a_token_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    monkeypatch.setenv("AMI_ANTENNA_API_BASE_URL", REMOTE)
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"Antenna at {REMOTE} is not on this machine and no API token is configured" in err
    assert "AMI_ANTENNA_API_TOKEN" in err


def test_transport_auto_uses_rest_unless_nats_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    name, why = WorkerSettings().transport_choice()
    assert name == "rest" and "no NATS URL configured" in why and "ack_wait 30s" in why
    monkeypatch.setenv("AMI_NATS_URL", "nats://10.0.0.2:4222")
    name, why = WorkerSettings().transport_choice()
    assert name == "nats" and "nats://10.0.0.2:4222" in why
    assert WorkerSettings(transport="rest").transport_choice()[0] == "rest"
    monkeypatch.delenv("AMI_NATS_URL")
    with pytest.raises(ValueError, match="transport nats needs a NATS URL"):
        WorkerSettings(transport="nats")
    assert WorkerSettings().rest_ack_wait_s == 30.0  # never more than Antenna's smallest ack_wait in use


def test_devices_is_a_host_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert HostSettings().devices == []
    monkeypatch.setenv("AMI_DEVICES", "cuda:0, cuda:1")
    assert HostSettings().devices == ["cuda:0", "cuda:1"]


def test_help_names_upstream_variables_too() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, WorkerSettings)
    text = " ".join(parser.format_help().split())
    assert "env AMI_ANTENNA_API_URL or AMI_ANTENNA_API_BASE_URL" in text
    assert "env AMI_ANTENNA_API_TOKEN or AMI_ANTENNA_API_AUTH_TOKEN" in text
    assert "env AMI_ANTENNA_SERVICE_NAME" in text and "env AMI_ANTENNA_API_BATCH_SIZE" in text
