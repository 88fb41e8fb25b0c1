"""Announce this service's pipelines to an Antenna project, as the upstream worker does.

``POST {api}/projects/{id}/pipelines/`` with ``{processing_service_name, pipelines}``: one
``PipelineConfigResponse`` per slug listing its algorithms (detector, moth filter where the
pipeline has one, terminal classifier) with upstream's names, keys, task types, weight URIs
and full category maps. Antenna resolves each classification's scores against the category
map registered here, so the label maps must be present (or downloadable): a missing one is a
``MissingWeights`` error, not a registration with empty classes.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx

from antenna_flows.models.registry import ClassifierSpec, DetectorSpec, PipelineSpec, get_pipeline, pipeline_slugs
from antenna_flows.models.weights import load_label_map, resolve
from antenna_flows.schemas import (
    AlgorithmCategoryMapResponse,
    AlgorithmConfigResponse,
    PipelineConfigResponse,
    PipelineRegistrationRequest,
)
from antenna_flows.settings import WorkerSettings

DEFAULT_SERVICE_NAME = "antenna-flows"
TIMEOUT_S = 60.0


class RegistrationFailed(RuntimeError):
    """Antenna refused the registration; the message carries its status and answer."""


def full_service_name(name: str | None = None) -> str:
    """``"{name} ({hostname})"``, upstream's processing-service name."""
    return f"{name or DEFAULT_SERVICE_NAME} ({socket.gethostname()})"


def _algorithm(spec: DetectorSpec | ClassifierSpec, weights_dir: Path, allow_download: bool) -> AlgorithmConfigResponse:
    if isinstance(spec, DetectorSpec):
        category_map = AlgorithmCategoryMapResponse(data=[], labels=[], uri=None)  # upstream sends an empty map
    else:
        labels = load_label_map(resolve(spec.labels, weights_dir, allow_download=allow_download,
                                        what=f"label map of {spec.name!r}"))
        category_map = AlgorithmCategoryMapResponse(
            data=[{"index": i, "label": label, "taxon_rank": spec.taxon_rank} for i, label in enumerate(labels)],
            labels=labels,
            uri=spec.labels.url,
        )
    return AlgorithmConfigResponse(
        name=spec.name,
        key=spec.key,
        description=spec.description,
        task_type=spec.task_type,
        uri=spec.weights.url,
        category_map=category_map,
    )


def pipeline_config(spec: PipelineSpec, weights_dir: Path, allow_download: bool = False) -> PipelineConfigResponse:
    return PipelineConfigResponse(
        name=spec.name,
        slug=spec.slug,
        version=spec.version,
        description=spec.description,
        algorithms=[_algorithm(stage, weights_dir, allow_download) for stage in spec.stages],
    )


def build_pipeline_configs(
    slugs: list[str] | None = None,
    *,
    weights_dir: Path | None = None,
    allow_download: bool | None = None,
) -> list[PipelineConfigResponse]:
    """Configs of ``slugs`` (default: every registry pipeline). Label maps come from
    ``weights_dir``; both it and ``allow_download`` default to the worker settings."""
    if weights_dir is None or allow_download is None:
        settings = WorkerSettings()
        weights_dir = settings.weights_dir if weights_dir is None else weights_dir
        allow_download = settings.allow_weight_download if allow_download is None else allow_download
    return [pipeline_config(get_pipeline(slug), weights_dir, allow_download) for slug in (slugs or pipeline_slugs())]


async def register_pipelines(
    api_url: str,
    token: str,
    project_id: int,
    service_name: str | None = None,
    slugs: list[str] | None = None,
    *,
    weights_dir: Path | None = None,
    allow_download: bool | None = None,
) -> dict[str, Any]:
    """Register the pipelines with project ``project_id``; returns Antenna's answer
    (``pipelines_created``, ``pipelines_updated``, ``processing_service_id``)."""
    configs = build_pipeline_configs(slugs, weights_dir=weights_dir, allow_download=allow_download)
    body = PipelineRegistrationRequest(processing_service_name=full_service_name(service_name), pipelines=configs)
    url = f"{api_url.rstrip('/')}/projects/{project_id}/pipelines/"
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        response = await client.post(url, json=body.model_dump(mode="json"), headers={"Authorization": f"Token {token}"})
    if response.is_error:
        raise RegistrationFailed(f"POST {url}: HTTP {response.status_code}: {response.text[:2000]}")
    return response.json()
