"""Shapes of the local API's admin extension (creating and reading jobs), beyond Antenna's contract.

Antenna creates jobs in its own UI; the local stand-in needs an endpoint for
that, and a job object that shows progress and the queue's statistics in one
place (what the field report's table shows). The contract shapes live in
:mod:`antenna_flows.schemas`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SLUG_PATTERN = r"^[-a-zA-Z0-9_]+$"  # Django's slug validator

# Antenna's job states (Celery's names) and dispatch modes
CREATED = "CREATED"
PENDING = "PENDING"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
CANCELING = "CANCELING"
ACTIVE_STATES = (STARTED, RETRY)
FINAL_STATES = (SUCCESS, FAILURE, REVOKED)


class Job(BaseModel):
    """A job with its progress and its consumer's statistics.

    ``results``/``errors`` count images whose first result was a success/an
    error, ``duplicates`` the results received beyond the first per image.
    ``messages``..``redeliveries`` are read from NATS: live on ``GET /jobs/{id}/``
    while the job is active, sampled every second for listings, and frozen at
    the snapshot taken just before the job's stream is deleted. ``redelivered``
    is NATS's ``num_redelivered`` (unacked redelivered messages);
    ``redeliveries`` is cumulative (deliveries beyond each message's first).
    ``dead_lettered`` counts the error results the dead-letter reaper made
    (work never done), apart from a worker's deliberate errors.
    States: CREATED, PENDING (queued), STARTED, then SUCCESS or FAILURE (more
    than half the images failed), or CANCELING and REVOKED.
    Times are unix seconds.
    """

    model_config = ConfigDict(extra="ignore")

    id: int
    name: str
    project_id: int
    pipeline_slug: str
    priority: int = 0
    status: str
    dispatch_mode: str
    ack_wait_s: float
    max_deliver: int
    created_at: float
    started_at: float | None = None
    first_result_at: float | None = None
    last_result_at: float | None = None  # when the job's latest image got its first answer
    completed_at: float | None = None
    cancelled_at: float | None = None
    total: int
    results: int = 0
    errors: int = 0
    duplicates: int = 0
    dead_lettered: int = 0  # of ``errors``: images answered only by the dead-letter reaper
    messages: int = 0
    pending: int = 0
    ack_pending: int = 0
    redelivered: int = 0
    deliveries: int = 0
    redeliveries: int = 0
    stats_at: float | None = None

    @property
    def processed(self) -> int:
        return self.results + self.errors

    def antenna_fields(self) -> dict[str, Any]:
        """What Antenna's job serializers add that a worker reads (``ami/jobs/serializers.py``, the job's
        ``progress`` JSON, ``ami/jobs/models.py`` ``JobProgress``): the pipeline and project nested, and the
        progress stages: ``collect`` (``total_images``), ``process`` (processed, remaining, failed) and
        ``results`` (its ``progress``: the fraction of images whose answer is saved). A worker pacing over
        REST reads saved counts there. Here an answer counts in both stages once it is saved."""
        fraction = self.processed / self.total if self.total else 1.0
        stage_status = "SUCCESS" if self.final and self.status != REVOKED else self.status
        done = self.final or fraction >= 1.0

        def stage(key: str, name: str, params: list[tuple[str, str, Any]], progress: float) -> dict[str, Any]:
            return {"status": "SUCCESS" if progress >= 1.0 else stage_status, "progress": round(progress, 6),
                    "key": key, "name": name,
                    "params": [{"name": n, "key": k, "category": "default", "value": v} for n, k, v in params]}

        return {
            "pipeline": {"slug": self.pipeline_slug, "name": self.pipeline_slug},
            "project": {"id": self.project_id},
            "progress": {
                "summary": {"status": self.status, "progress": 1.0 if done else round(fraction, 6)},
                "stages": [
                    stage("collect", "Collect", [("Total Images", "total_images", self.total)], 1.0),
                    stage("process", "Process", [("Processed", "processed", self.processed),
                                                 ("Remaining", "remaining", self.total - self.processed),
                                                 ("Failed", "failed", self.errors)], fraction),
                    stage("results", "Results", [("Captures", "captures", self.results),
                                                 ("Detections", "detections", self.results),
                                                 ("Classifications", "classifications", self.results)], fraction),
                ],
                "errors": [],
                "logs": [],
            },
        }

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES


class ImageRef(BaseModel):
    """An image of a new job: its URL and, optionally, its id (else the store assigns one)."""

    model_config = ConfigDict(extra="ignore")

    url: str = Field(min_length=1)
    id: str | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class JobCreate(BaseModel):
    """``POST /jobs/`` body: a pipeline and images (as objects or bare URLs)."""

    model_config = ConfigDict(extra="ignore")

    pipeline: str = Field(min_length=1, max_length=255, pattern=SLUG_PATTERN)
    images: list[ImageRef] | None = None
    image_urls: list[str] | None = None
    priority: int = 0
    id: int | None = Field(None, ge=1)
    name: str | None = Field(None, max_length=255)
    project_id: int = Field(1, ge=1)
    dispatch_mode: Literal["async_api", "sync_api", "internal"] = "async_api"
    start: bool = True

    @model_validator(mode="after")
    def _one_image_list(self) -> "JobCreate":
        if (self.images is None) == (self.image_urls is None):
            raise ValueError("Give exactly one of 'images' and 'image_urls'.")
        if not self.image_refs():
            raise ValueError("A job needs at least one image.")
        if any(not url for url in self.image_urls or ()):
            raise ValueError("Image URLs may not be blank.")
        return self

    def image_refs(self) -> list[ImageRef]:
        return self.images if self.images is not None else [ImageRef(url=u) for u in self.image_urls or ()]
