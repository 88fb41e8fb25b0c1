"""Every knob of antenna-flows, read from the environment (``AMI_`` prefix) and ``.env``.

:class:`AntennaSettings`: which Antenna and with which token (every command that talks to it).
:class:`WorkerSettings`: one worker process (one GPU), so ``antenna-flows worker --help`` lists
exactly what it reads. :class:`HostSettings`: what one ``worker`` command runs on a host (one
worker process per device). (The lab's stand-in Antenna and bench have settings of their own,
in ``antenna_lab.settings``.)

An operator of the upstream worker (``ami worker``, AMI Data Companion ``trapdata/settings.py``)
keeps their ``.env``: ``AMI_ANTENNA_API_BASE_URL`` and ``AMI_ANTENNA_API_AUTH_TOKEN`` are read as
aliases of ``AMI_ANTENNA_API_URL`` and ``AMI_ANTENNA_API_TOKEN`` (within one source ours wins;
the process environment beats ``.env`` whatever the name), ``AMI_ANTENNA_SERVICE_NAME`` and
``AMI_ANTENNA_API_BATCH_SIZE`` are our names too, and :func:`upstream_notes` says what happens to
every other upstream setting (docs/migrating-from-ami-worker.md).

Defaults are what a single-machine deployment wants; Antenna's own defaults are noted where they
differ. The dev token is only ever sent to an Antenna on this machine: aimed elsewhere with no
token configured, the settings refuse to validate.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "AMI_"
ENV_FILE = ".env"
DEFAULT_TOKEN = "antenna-dev-token"  # the local stand-in's token; never sent to a non-local Antenna
DEFAULT_API_URL = "http://127.0.0.1:8000/api/v2"
DEFAULT_SERVICE_NAME = "antenna-flows"
LOCAL_HOSTS = {"localhost", "localhost.localdomain"}

# Upstream names read as aliases of ours (same meaning). Ours is listed first: within one
# source (environment, .env) ours wins.
UPSTREAM_ALIASES: dict[str, str] = {
    "antenna_api_url": "AMI_ANTENNA_API_BASE_URL",
    "antenna_api_token": "AMI_ANTENNA_API_AUTH_TOKEN",
}

# The rest of upstream's settings (ADC trapdata/settings.py at a33746a): why each is not read.
UPSTREAM_UNUSED: dict[str, str] = {
    "AMI_NUM_WORKERS": "upstream's DataLoader subprocesses per GPU, each reserving and downloading on its own; "
    "here one process per GPU downloads in threads (AMI_DOWNLOAD_CONCURRENCY) and reserves only what the GPU "
    "starts well inside ack_wait. One process per GPU: `antenna-flows worker --devices all`",
    "AMI_LOCALIZATION_BATCH_SIZE": "not read by `ami worker` either (its GPU batch is AMI_ANTENNA_API_BATCH_SIZE); "
    "the GPU batch here is AMI_MAX_BATCH_SIZE",
    "AMI_CLASSIFICATION_BATCH_SIZE": "not read by `ami worker` either; crops are classified per GPU batch here",
    "AMI_CLASSIFICATION_THRESHOLD": "a display filter of upstream's desktop app, not read by `ami worker`; "
    "every classification is sent to Antenna, which filters",
    "AMI_USER_DATA_PATH": "upstream's desktop-app data folder (`ami worker` keeps weights in $TORCH_HOME/hub/models); "
    "weights are read from AMI_WEIGHTS_DIR here: point it at that folder to reuse upstream's downloads",
    "AMI_DATABASE_URL": "upstream's desktop-app database, not used by a worker",
    "AMI_IMAGE_BASE_PATH": "upstream's desktop-app image folder, not used by a worker",
    "AMI_LOCALIZATION_MODEL": "upstream's desktop-app model choice; a worker runs the models of each job's pipeline",
    "AMI_BINARY_CLASSIFICATION_MODEL": "upstream's desktop-app model choice; a worker runs the models of each job's pipeline",
    "AMI_SPECIES_CLASSIFICATION_MODEL": "upstream's desktop-app model choice; a worker runs the models of each job's "
    "pipeline (serve fewer with AMI_PIPELINES)",
    "AMI_FEATURE_EXTRACTOR": "upstream's desktop-app feature extractor, not used by a worker",
}


def settings_config() -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        validate_by_name=True,  # fields with upstream aliases still take their own names (CLI, Python)
        validate_by_alias=True,
    )


def env_names(name: str, field: Any = None) -> list[str]:
    """The environment variables a field is read from, ours first (``AMI_NAME``, then upstream's alias)."""
    alias = getattr(field, "validation_alias", None)
    if isinstance(alias, AliasChoices):
        return [str(choice).upper() for choice in alias.choices]
    return [f"{ENV_PREFIX}{name.upper()}"]


def _aliased(name: str) -> AliasChoices:
    return AliasChoices(f"{ENV_PREFIX}{name.upper()}", UPSTREAM_ALIASES[name])


def _split_csv(value: Any) -> Any:
    """Accept ``a,b`` as well as a JSON list for list-valued env vars."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def is_local_url(url: str) -> bool:
    """Does ``url`` point at this machine (loopback address or ``localhost``)?"""
    host = (urlsplit(url).hostname or "").lower()
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AntennaSettings(BaseSettings):
    """Which Antenna API, and the token it is called with (every command that talks to Antenna)."""

    model_config = settings_config()

    antenna_api_url: str = Field(
        DEFAULT_API_URL,
        validation_alias=_aliased("antenna_api_url"),
        description="Base URL of Antenna's API (ending in /api/v2).",
    )
    antenna_api_token: str = Field(
        None,  # type: ignore[arg-type] - resolved by the validator below, always a str after it
        validation_alias=_aliased("antenna_api_token"),
        description=f"Antenna API token (sent as 'Authorization: Token ...'). Unset: {DEFAULT_TOKEN} for an Antenna "
        "on this machine (the lab's stand-in); required for any other Antenna.",
    )

    @field_validator("antenna_api_token", mode="before")
    @classmethod
    def _token(cls, value: Any, info: ValidationInfo) -> Any:
        """No token configured: the dev token for a local Antenna, else refuse (never send it elsewhere)."""
        if value is not None and str(value).strip():
            return str(value).strip()
        url = info.data.get("antenna_api_url")
        if url is None:  # the URL itself is invalid: that error is the one to report
            return DEFAULT_TOKEN
        if is_local_url(url):
            return DEFAULT_TOKEN
        raise ValueError(
            f"Antenna at {url} is not on this machine and no API token is configured: set AMI_ANTENNA_API_TOKEN "
            "(or upstream's AMI_ANTENNA_API_AUTH_TOKEN) in the environment or .env, or pass --antenna-api-token "
            f"(the dev token {DEFAULT_TOKEN!r} is only ever sent to a local Antenna)"
        )


class WorkerSettings(AntennaSettings):
    """One fair worker: which Antenna, which NATS, which pipelines, and its limits."""

    model_config = settings_config()

    antenna_service_name: str = Field(
        DEFAULT_SERVICE_NAME,
        description="Processing service name this worker registers as (sent as '{name} ({hostname})', as upstream).",
    )
    antenna_api_batch_size: int = Field(
        24, ge=1,
        description="Most tasks asked for in one reservation request and most results sent in one result post "
        "(upstream's batch size; Antenna does one JetStream fetch per request). Unless max_batch_size is set, the "
        "largest GPU batch too when smaller (upstream's GPU batch is this size).",
    )
    nats_url: str | None = Field(
        None,
        description="NATS server the job streams live on (Antenna's NATS_URL). Unset: Antenna's REST API only "
        "(transport auto); production hosts usually reach Antenna over HTTPS only.",
    )
    transport: Literal["auto", "nats", "rest"] = Field(
        "auto",
        description="How tasks are reserved: 'nats' (JetStream directly: +WPI, nak, advisories), 'rest' "
        "(Antenna's POST /jobs/{id}/tasks/ only, for workers that cannot reach NATS), 'auto' (nats when nats_url "
        "is set, else rest).",
    )
    rest_ack_wait_s: float = Field(
        30.0, gt=0,
        description="rest transport: Antenna's NATS_TASK_TTR (ack_wait), which the worker cannot read over REST. "
        "Assuming more than the truth causes redeliveries, less only a few more requests: the default is "
        "Antenna's code fallback, the smallest in use (its settings say 300, the field report 120).",
    )
    pipelines: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Pipeline slugs this worker serves, comma separated (empty: every pipeline the model kind knows).",
    )
    job_ids: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="Serve only these job ids, comma separated (empty: every incomplete job of the served pipelines).",
    )
    exit_when_done: bool = Field(
        False, description="With job_ids: stop once none of them is incomplete any more (ad-hoc runs on a spare GPU)."
    )
    worker_name: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name in logs, artifacts and client_info.",
    )
    model_kind: Literal["ami", "sim"] = Field(
        "ami",
        description="'ami': the torch pipeline; 'sim': a timed stand-in that serves pipelines of its own, "
        "sim-<slug> (never a real pipeline).",
    )
    device: str = Field(
        "auto",
        description="Torch device: auto (the first GPU, else CPU), cpu, cuda, cuda:N. One worker per GPU: --devices all.",
    )
    weights_dir: Path = Field(
        Path("~/.cache/antenna-flows/weights"), description="Where model weights and label maps live (downloaded once)."
    )
    allow_weight_download: bool = Field(
        False, description="Download missing weights from their published URLs (off: a missing file is an error)."
    )
    sim_seconds_per_image: float = Field(0.05, ge=0, description="sim model: slot seconds per image.")
    sim_seconds_per_batch: float = Field(0.02, ge=0, description="sim model: fixed slot seconds per batch.")

    max_batch_size: int = Field(8, ge=1, description="Largest GPU batch (images from any jobs of one pipeline).")
    slots: int = Field(
        1, ge=1, le=8,
        description="Inference slots per GPU: batches in flight at once, so the GPU runs one while the CPU turns "
        "another into results (the scheduler and the reservation budget count slots).",
    )
    prefetch_batches: int = Field(
        1, ge=1, description="Batches reserved and decoded ahead of the slot (within the reservation cap)."
    )
    batch_fill_wait_s: float = Field(
        0.05, ge=0, description="Longest wait for loading images to fill a batch before running a smaller one."
    )
    prefetch_lead_s: float = Field(
        2.0, ge=0, description="When not even one image fits the window, reserve the next this long before the slot frees."
    )
    initial_seconds_per_image: float = Field(
        1.0, gt=0, description="Slot seconds per image assumed until the first batch is measured."
    )
    reserve_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Reserved-but-not-started tasks are capped to what the slot starts within this fraction of ack_wait.",
    )
    in_progress_fraction: float = Field(
        1 / 3, gt=0, lt=1, description="Send +WPI to every held task each ack_wait times this fraction."
    )
    discovery_interval_s: float = Field(
        4.0, gt=0,
        description="Seconds between job polls of the whole fleet: each worker polls every this many seconds times "
        "the fleet size it measures (its share of the jobs' deliveries), at a random phase, so Antenna sees the "
        "same rate from 1 worker or 100 (over NATS, JetStream stream-created advisories wake workers at once).",
    )
    busy_discovery_interval_s: float = Field(
        5.0, gt=0,
        description="rest transport, while serving jobs: the fleet's seconds between job polls (each worker: this "
        "times the fleet size). Over REST these polls also read the jobs' saved counts that pace the fleet to "
        "Antenna's saves, and nothing announces new jobs. On Antenna a full job list costs ~0.1-0.2 s of its web "
        "CPU, which its saves share: keep them rare.",
    )
    save_backlog_s: float = Field(
        5.0, gt=0,
        description="Pace to Antenna's saves: keep the fleet's answers in flight (held, or queued for Antenna's "
        "save) within what Antenna saves in this many seconds plus what the GPUs hold, measured from the jobs' "
        "saved counts. Small: a newcomer's results wait little behind others' in Antenna's one save queue; "
        "too small: the save queue runs dry between posts.",
    )
    pace_to_saves: bool = Field(
        True, description="Reserve no faster than Antenna saves (off: reserve as fast as the GPU runs)."
    )
    watch_interval_s: float = Field(
        1.0, gt=0,
        description="nats transport: seconds between reads of each served job's consumer (saved count, ack floor: "
        "JetStream only, nothing asked of Antenna).",
    )
    post_max_delay_s: float = Field(
        1.0, ge=0,
        description="Longest an answer waits to be posted with more of its job's answers (a job's last answers "
        "this worker holds go at once); posts carry at most antenna_api_batch_size results.",
    )
    min_reserve_chunk: int = Field(
        8, ge=1,
        description="While paced to Antenna's saves, reserve at least this many tasks of one job at a time (one "
        "request, one post), waiting for that much room rather than asking for one or two.",
    )
    idle_forget_s: float = Field(
        20.0, gt=0, description="Forget a job after this long with nothing available and nothing in flight."
    )
    session_max_s: float = Field(
        600.0, gt=0, description="Longest inference session (one Prefect subflow run) before a new one starts."
    )
    session_idle_s: float = Field(60.0, gt=0, description="End an inference session after this long with no work.")
    max_runtime_s: float | None = Field(86400.0, gt=0, description="Stop gracefully after this many seconds (a day; then the next run takes over; None: run until signalled).")
    post_retries: int = Field(4, ge=0, description="Retries of a result POST before its tasks are released (nak).")
    post_retry_delay_s: float = Field(0.5, gt=0, description="First retry delay of a result POST; doubles each retry, jittered.")
    release_delay_s: float = Field(
        2.0, ge=0, description="Base nak delay when releasing tasks; jittered up to 2x so a fleet does not re-reserve in lock-step."
    )
    http_timeout_s: float = Field(30.0, gt=0, description="Timeout of one API request.")
    image_timeout_s: float = Field(30.0, gt=0, description="Total time allowed for one image download (connect to last byte).")
    image_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest image accepted (bytes).")
    image_max_pixels: int = Field(80_000_000, ge=1, description="Largest image accepted (pixels), a guard against decompression bombs.")
    image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts images may be downloaded from, comma separated ('name' or '*.name'); empty: any host. "
        "URLs (and redirects) to other hosts get an error result without being fetched.",
    )
    image_max_redirects: int = Field(3, ge=0, description="Redirects followed per image download (each hop checked).")
    download_concurrency: int = Field(16, ge=1, description="Image downloads in flight at once.")
    metrics_file: Path | None = Field(None, description="Append one JSON line per batch here (used by the bench).")
    ready_file: Path | None = Field(None, description="Touch this file once the worker is polling (used by the bench).")
    inference_precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="ami model on GPU: autocast dtype (auto: bf16 where supported, else fp16). CPU is always fp32."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="ami model: CPU threads for torch (unset: torch's default; set when workers share a CPU)."
    )
    max_loaded_pipelines: int = Field(
        3, ge=1, description="ami model: terminal classifiers kept loaded (LRU); the detector and moth filter are shared."
    )

    @field_validator("pipelines", "job_ids", "image_hosts", mode="before")
    @classmethod
    def _pipelines_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("weights_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _coherent(self) -> "WorkerSettings":
        if self.transport == "nats" and not self.nats_url:
            raise ValueError("transport nats needs a NATS URL: set AMI_NATS_URL or --nats-url (or use transport auto/rest)")
        if (
            "antenna_api_batch_size" in self.model_fields_set
            and "max_batch_size" not in self.model_fields_set
            and self.antenna_api_batch_size < self.max_batch_size
        ):
            # upstream's GPU batch is its API batch: a host tuned for its GPU memory keeps that bound
            self.max_batch_size = self.antenna_api_batch_size
        return self

    def transport_choice(self) -> tuple[Literal["nats", "rest"], str]:
        """Which path the worker reserves tasks on, and why (for its start-up log line)."""
        if self.transport == "rest":
            return "rest", f"transport rest configured: Antenna's REST API at {self.antenna_api_url}"
        if self.transport == "nats":
            return "nats", f"transport nats configured: NATS at {self.nats_url}"
        if self.nats_url:
            return "nats", f"transport auto and a NATS URL is configured (AMI_NATS_URL): NATS at {self.nats_url}"
        return "rest", (
            f"transport auto and no NATS URL configured (AMI_NATS_URL, --nats-url): Antenna's REST API at "
            f"{self.antenna_api_url}, assuming ack_wait {self.rest_ack_wait_s:g}s (AMI_REST_ACK_WAIT_S)"
        )


class HostSettings(BaseSettings):
    """What one ``antenna-flows worker`` command runs on this host: one worker process per device."""

    model_config = settings_config()

    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Run one worker process per device, comma separated: 'all' (every visible GPU; one CPU worker "
        "on a host without one), or a list such as cuda:0,cuda:1 or cpu,cpu. Each process gets --device and a "
        "worker name suffixed with its device; SIGTERM/SIGINT reach them all. Empty: one worker on --device.",
    )

    @field_validator("devices", mode="before")
    @classmethod
    def _devices_csv(cls, value: Any) -> Any:
        return _split_csv(value)


def upstream_notes(environ: Mapping[str, str] | None = None, env_file: Path | str | None = ENV_FILE) -> list[str]:
    """What happens to the upstream worker's settings found in the environment and ``env_file``.

    One line per upstream name that is set and not simply read: an alias shadowed by our own
    name with a different value (which one is used), and each setting we do not read (why, and
    what to use instead). Tokens are never shown.
    """
    env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
    dotenv: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        from dotenv import dotenv_values

        dotenv = {k.upper(): v for k, v in dotenv_values(env_file).items() if v is not None}
    notes = []
    for field, upstream in UPSTREAM_ALIASES.items():
        ours = f"{ENV_PREFIX}{field.upper()}"
        found = [(source, name, values[name]) for source, values in (("environment", env), (".env", dotenv))
                 for name in (ours, upstream) if name in values]
        if len({value for _, _, value in found}) > 1:
            source, name, value = found[0]
            shown = "" if field == "antenna_api_token" else f" ({value})"
            others = ", ".join(f"{n} in {src}" for src, n, _ in found[1:])
            notes.append(f"{name} in {source}{shown} is used; {others} differs and is ignored "
                         "(ours before upstream's within a source, the environment before .env)")
    for name, why in UPSTREAM_UNUSED.items():
        if name in env or name in dotenv:
            notes.append(f"{name} (upstream setting) is not read: {why}")
    return notes
