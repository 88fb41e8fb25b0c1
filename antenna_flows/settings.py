"""Every knob of antenna-flows, read from the environment (``AMI_`` prefix) and ``.env``.

:class:`WorkerSettings`: one worker process (one GPU), so ``antenna-flows worker
--help`` lists exactly what it reads. (The lab's stand-in Antenna and bench have
settings of their own, in ``antenna_lab.settings``.)

Defaults are what a single-machine deployment wants; Antenna's own defaults
are noted where they differ.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "AMI_"
DEFAULT_TOKEN = "antenna-dev-token"
DEFAULT_API_URL = "http://127.0.0.1:8000/api/v2"


def settings_config() -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )


def _split_csv(value: Any) -> Any:
    """Accept ``a,b`` as well as a JSON list for list-valued env vars."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class WorkerSettings(BaseSettings):
    """One fair worker: which Antenna, which NATS, which pipelines, and its limits."""

    model_config = settings_config()

    antenna_api_url: str = Field(DEFAULT_API_URL, description="Base URL of Antenna's API (ending in /api/v2).")
    antenna_api_token: str = Field(DEFAULT_TOKEN, description="Antenna API token (sent as 'Authorization: Token ...').")
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server the job streams live on.")
    transport: Literal["nats", "rest"] = Field(
        "nats",
        description="How tasks are reserved: 'nats' (JetStream directly: +WPI, nak, advisories) or 'rest' "
        "(Antenna's POST /jobs/{id}/tasks/ only, for workers that cannot reach NATS).",
    )
    rest_ack_wait_s: float = Field(
        300.0, gt=0, description="rest transport: Antenna's NATS_TASK_TTR, which the worker cannot read itself."
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
    model_kind: Literal["ami", "sim"] = Field("ami", description="'ami': the torch pipeline; 'sim': a timed stand-in.")
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:N.")
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
        description="Seconds between job polls: a fleet idles at <= 0.25 requests per worker-second (over NATS, "
        "JetStream stream-created advisories wake it at once).",
    )
    busy_discovery_interval_s: float = Field(
        1.0, gt=0,
        description="rest transport, while serving jobs: seconds between job polls (nothing announces new jobs "
        "over REST; a busy worker's requests are dominated by its work, so a faster poll costs little).",
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
