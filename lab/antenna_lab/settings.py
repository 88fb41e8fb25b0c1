"""The lab's settings: the local Antenna's NATS and API, and the drain baseline.

Same conventions as the product's (``AMI_`` prefix, ``.env``; see
``antenna_flows.settings``), kept here so the product never carries them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from antenna_flows.settings import DEFAULT_TOKEN, settings_config as _config


class QueueSettings(BaseSettings):
    """Antenna's JetStream settings for job streams (names as in Antenna's settings)."""

    model_config = _config()

    nats_url: str | None = Field(
        None,
        description="NATS server URL (nats://host:port). Unset: commands that need one start an embedded nats-server.",
    )
    nats_task_ttr: float = Field(
        300.0, gt=0, description="Consumer ack_wait in seconds (Antenna's NATS_TASK_TTR; 300 in its settings)."
    )
    nats_max_deliver: int = Field(5, ge=1, description="Consumer max_deliver (Antenna's NATS_MAX_DELIVER; 5 in production).")
    nats_max_ack_pending: int = Field(
        1000, ge=1, description="Consumer max_ack_pending (Antenna's NATS_MAX_ACK_PENDING)."
    )
    nats_store_dir: Path | None = Field(
        None, description="JetStream store directory for an embedded nats-server (default: a temporary directory)."
    )


class ApiSettings(BaseSettings):
    """The local Antenna-compatible API (a stand-in for Antenna's job plane)."""

    model_config = _config()

    api_host: str = Field("127.0.0.1", description="Interface the local API binds to.")
    api_port: int = Field(8000, ge=0, le=65535, description="Port of the local API (0: any free port).")
    api_token: str = Field(DEFAULT_TOKEN, description="The one token the local API accepts (Authorization: Token ...).")
    api_db_path: Path | None = Field(None, description="SQLite file for jobs and results (default: in the data dir).")
    data_dir: Path = Field(Path("var"), description="Where the local stack keeps its database, images and NATS store.")
    api_max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest request body the local API accepts (413 above)."
    )
    antenna_costs: Path | None = Field(
        None,
        description="JSON file with what requests and saves cost, as a scenario's `antenna` section (or a scenario "
        "that has one): web_workers, request_s {jobs, tasks, result, result_per_item}, save_workers, "
        "save_s_per_result. Unset: requests and saves cost nothing.",
    )


class DrainSettings(BaseSettings):
    """The upstream worker's knobs, for the ``drain`` baseline (``--strategy drain``)."""

    model_config = _config()

    drain_batch_size: int = Field(24, ge=1, description="drain: tasks per POST /tasks/ (upstream antenna_api_batch_size).")
    drain_loaders: int = Field(4, ge=1, description="drain: DataLoader subprocesses reserving in parallel (num_workers).")
    drain_prefetch: int = Field(4, ge=1, description="drain: batches each loader holds ahead of the GPU (prefetch_factor).")
    drain_idle_sleep_s: float = Field(5.0, ge=0, description="drain: sleep when no job is found (SLEEP_TIME_SECONDS).")
