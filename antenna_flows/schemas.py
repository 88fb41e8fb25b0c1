"""Antenna's wire schemas, field for field (see shared/context/antenna-contract.md).

These are the only shapes that cross the API and NATS boundary. Both sides of
this project (the worker and the local Antenna-compatible API) use them, so a
drift from the contract shows up in tests on both sides at once.
"""

from __future__ import annotations

from typing import Any

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SerializationInfo, SerializerFunctionWrapHandler, WrapSerializer


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --- tasks (NATS message bodies and POST /jobs/{id}/tasks/) -----------------


class PipelineProcessingTask(BaseModel):
    """One image to process. Antenna sets ``id == image_id ==`` the SourceImage pk as text."""

    model_config = ConfigDict(extra="ignore")

    id: str
    image_id: str
    image_url: str
    reply_subject: str | None = None


class TasksRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    batch_size: int = Field(ge=1)
    client_info: dict[str, Any] | None = None


class TasksResponse(BaseModel):
    tasks: list[PipelineProcessingTask]


# --- results -----------------------------------------------------------------


class AlgorithmReference(BaseModel):
    name: str
    key: str


class BoundingBox(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float


def _floats(value: Any, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
    if isinstance(value, list):
        return handler(value)
    # A float32 array from the model: left as is in Python dumps (results_codec writes it
    # without a Python float per value), a list for pydantic's own JSON.
    return value.tolist() if info.mode_is_json() else value


# list[float] on the wire and in validation (the JSON schema is unchanged); the model side may
# also hold a 1-D numpy array here (built with model_construct), see antenna_flows/results_codec.py.
FloatList = Annotated[list[float], WrapSerializer(_floats)]


class ClassificationResponse(BaseModel):
    classification: str
    labels: list[str] | None = None
    scores: FloatList = Field(default_factory=list)
    logits: FloatList | None = None
    inference_time: float | None = None
    algorithm: AlgorithmReference
    terminal: bool = True
    timestamp: dt.datetime


class DetectionResponse(BaseModel):
    source_image_id: str
    bbox: BoundingBox | None = None  # Antenna allows a detection without a box (ami/ml/schemas.py)
    inference_time: float | None = None
    algorithm: AlgorithmReference
    timestamp: dt.datetime
    crop_image_url: str | None = None
    classifications: list[ClassificationResponse] = Field(default_factory=list)


class SourceImageResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    url: str


class PipelineResultsResponse(BaseModel):
    """A successful result; the worker sends one per image (one source image each)."""

    pipeline: str
    algorithms: dict[str, Any] = Field(default_factory=dict)  # deprecated upstream: send {}
    total_time: float
    source_images: list[SourceImageResponse]
    detections: list[DetectionResponse]
    errors: list[Any] | str | None = None


class PipelineResultsError(BaseModel):
    """An image that can never succeed (missing, corrupt, malformed task...)."""

    error: str
    image_id: str | None = None


class TaskResult(BaseModel):
    reply_subject: str
    # Order matters: a body with 'error' but no 'pipeline' must not validate as a success.
    result: PipelineResultsResponse | PipelineResultsError


class ResultsRequest(BaseModel):
    results: list[TaskResult]
    client_info: dict[str, Any] | None = None


class QueuedTask(BaseModel):
    reply_subject: str
    status: str = "queued"
    task_id: str


class ResultsResponse(BaseModel):
    status: str = "accepted"
    job_id: int
    results_queued: int
    tasks: list[QueuedTask]


# --- jobs ----------------------------------------------------------------------


class JobListItem(BaseModel):
    """``GET /jobs/?ids_only=1`` row. ``priority`` is our extension; Antenna omits it (read as 0).

    ``total`` and ``saved`` come only from the full list (no ``ids_only``), read from Antenna's
    job progress: the collect stage's ``total_images`` and the results stage's progress (an
    answer counts there once Antenna has saved it).
    """

    model_config = ConfigDict(extra="ignore")

    id: int
    pipeline_slug: str | None = None
    priority: int = 0
    total: int | None = None
    saved: int | None = None

    @classmethod
    def from_full_row(cls, row: dict[str, Any]) -> "JobListItem":
        """A row of Antenna's full job list (``pipeline`` nested, ``progress`` with stages)."""
        pipeline = row.get("pipeline")
        slug = pipeline.get("slug") if isinstance(pipeline, dict) else row.get("pipeline_slug")
        total = saved = None
        progress = row.get("progress")
        stages = progress.get("stages") if isinstance(progress, dict) else None
        for stage in stages if isinstance(stages, list) else []:
            if not isinstance(stage, dict):
                continue
            if stage.get("key") == "collect":
                for param in stage.get("params") or []:
                    if isinstance(param, dict) and param.get("key") == "total_images":
                        total = _int_or_none(param.get("value"))
            elif stage.get("key") == "results":
                fraction = stage.get("progress")
                saved = fraction if isinstance(fraction, (int, float)) else None
        saved_count = round(saved * total) if saved is not None and total is not None else None
        return cls(id=int(row["id"]), pipeline_slug=slug, priority=int(row.get("priority") or 0), total=total,
                   saved=saved_count)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class JobListResponse(BaseModel):
    count: int
    next: str | None = None
    previous: str | None = None
    results: list[JobListItem]


# --- pipeline registration -------------------------------------------------------


class AlgorithmCategoryMapResponse(BaseModel):
    data: list[dict[str, Any]] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    version: str | None = None
    description: str | None = None
    uri: str | None = None


class AlgorithmConfigResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    key: str
    description: str | None = None
    task_type: str | None = None
    version: int = 1
    version_name: str | None = None
    uri: str | None = None
    category_map: AlgorithmCategoryMapResponse | None = None


class PipelineStageParam(BaseModel):
    name: str
    key: str
    category: str = "default"


class PipelineStage(BaseModel):
    key: str
    name: str
    params: list[PipelineStageParam] = Field(default_factory=list)
    description: str | None = None


class PipelineConfigResponse(BaseModel):
    name: str
    slug: str
    version: int
    description: str | None = None
    algorithms: list[AlgorithmConfigResponse] = Field(default_factory=list)
    stages: list[PipelineStage] = Field(default_factory=list)


class PipelineRegistrationRequest(BaseModel):
    processing_service_name: str
    pipelines: list[PipelineConfigResponse] = Field(default_factory=list)


class PipelineRegistrationResponse(BaseModel):
    """Antenna's answer to a registration (201): what it now knows and what it created."""

    model_config = ConfigDict(extra="ignore")

    timestamp: dt.datetime = Field(default_factory=utcnow)
    success: bool = False
    error: str | None = None
    pipelines: list[PipelineConfigResponse] = Field(default_factory=list)
    pipelines_created: list[str] = Field(default_factory=list)
    algorithms_created: list[str] = Field(default_factory=list)
