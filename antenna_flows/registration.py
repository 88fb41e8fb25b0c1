"""Announce this service's pipelines to an Antenna project, as the upstream worker does.

``POST {api}/projects/{id}/pipelines/`` with ``{processing_service_name, pipelines}``: one
``PipelineConfigResponse`` per slug listing the algorithms the model kind's results name.
Antenna refuses, at save time, a result naming an algorithm its pipeline has not registered
(``PipelineNotConfigured``; the result is never acked), so a worker fleet must register what
its model kind declares before it posts results:

- ``ami``: detector, moth filter where the pipeline has one, terminal classifier, with
  upstream's names, keys, task types, weight URIs and full category maps. Antenna resolves
  each classification's scores against the category map registered here, so the label maps
  must be present (or downloadable): a missing one is a ``MissingWeights`` error, not a
  registration with empty classes.
- ``sim``: the simulated detector and classifier, for every registry pipeline (a staging
  fleet running ``sim`` against a real Antenna).

``category_maps=False`` declares the algorithms by name and key only (the local devstack's
pre-registration, which needs no label files). Sent with :class:`AntennaClient`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from antenna_flows.antenna_client import AntennaClient, AntennaError
from antenna_flows.models.registry import ClassifierSpec, DetectorSpec, PipelineSpec, get_pipeline, pipeline_slugs
from antenna_flows.models.weights import load_label_map, resolve
from antenna_flows.schemas import (
    AlgorithmCategoryMapResponse,
    AlgorithmConfigResponse,
    PipelineConfigResponse,
)
from antenna_flows.settings import WorkerSettings

DEFAULT_SERVICE_NAME = "antenna-flows"
TIMEOUT_S = 60.0
MODEL_KINDS = ("sim", "ami")
ModelKind = Literal["sim", "ami"]


class RegistrationFailed(AntennaError):
    """Antenna refused the registration (or could not be reached); the message carries its status and answer."""


def full_service_name(name: str | None = None) -> str:
    """``"{name} ({hostname})"``, upstream's processing-service name."""
    return f"{name or DEFAULT_SERVICE_NAME} ({socket.gethostname()})"


def _algorithm(
    spec: DetectorSpec | ClassifierSpec, weights_dir: Path, allow_download: bool, category_maps: bool = True
) -> AlgorithmConfigResponse:
    if not category_maps:
        category_map = None
    elif isinstance(spec, DetectorSpec):
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


def pipeline_config(
    spec: PipelineSpec, weights_dir: Path, allow_download: bool = False, category_maps: bool = True
) -> PipelineConfigResponse:
    return PipelineConfigResponse(
        name=spec.name,
        slug=spec.slug,
        version=spec.version,
        description=spec.description,
        algorithms=[_algorithm(stage, weights_dir, allow_download, category_maps) for stage in spec.stages],
    )


def sim_algorithms() -> list[AlgorithmConfigResponse]:
    """What the ``sim`` model's results name (``antenna_flows.models.sim``)."""
    from antenna_flows.models.sim import SIM_CLASSIFIER, SIM_DETECTOR

    return [
        AlgorithmConfigResponse(name=SIM_DETECTOR.name, key=SIM_DETECTOR.key, task_type="localization",
                                description="Timed stand-in for the detector (antenna-flows sim model)."),
        AlgorithmConfigResponse(name=SIM_CLASSIFIER.name, key=SIM_CLASSIFIER.key, task_type="classification",
                                description="Timed stand-in for the classifiers (antenna-flows sim model)."),
    ]


def sim_pipeline_config(spec: PipelineSpec) -> PipelineConfigResponse:
    return PipelineConfigResponse(
        name=spec.name, slug=spec.slug, version=spec.version, description=spec.description, algorithms=sim_algorithms()
    )


def declared_pipelines(
    model_kind: ModelKind,
    slugs: list[str] | None = None,
    *,
    weights_dir: Path | None = None,
    allow_download: bool | None = None,
    category_maps: bool = True,
) -> list[PipelineConfigResponse]:
    """The pipelines (default: every registry pipeline) with the algorithms ``model_kind`` declares."""
    if model_kind == "sim":
        return [sim_pipeline_config(get_pipeline(slug)) for slug in (slugs or pipeline_slugs())]
    if model_kind != "ami":
        raise ValueError(f"unknown model kind {model_kind!r}; known: {', '.join(MODEL_KINDS)}")
    if not category_maps:
        return [pipeline_config(get_pipeline(slug), Path(), False, category_maps=False) for slug in (slugs or pipeline_slugs())]
    return build_pipeline_configs(slugs, weights_dir=weights_dir, allow_download=allow_download)


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
    model_kind: ModelKind = "ami",
) -> dict[str, Any]:
    """Register the pipelines, with the algorithms ``model_kind`` declares, with project ``project_id``;
    returns Antenna's answer (``pipelines_created``, ``algorithms_created``, ``pipelines``, ...).
    Raises :class:`RegistrationFailed` when Antenna refuses it or cannot be reached."""
    configs = declared_pipelines(model_kind, slugs, weights_dir=weights_dir, allow_download=allow_download)
    async with AntennaClient(api_url, token, timeout_s=TIMEOUT_S) as client:
        try:
            return await client.register_pipelines(project_id, full_service_name(service_name), configs)
        except RegistrationFailed:
            raise
        except AntennaError as exc:
            raise RegistrationFailed(f"registration with project {project_id} failed: {exc}", exc.status, exc.body) from exc


def summary(answer: dict[str, Any], requested: list[str] | None = None) -> str:
    """A short account of Antenna's registration answer (not the whole 50 kB echo of every category map)."""
    created = list(answer.get("pipelines_created") or [])
    registered = [p.get("slug") for p in answer.get("pipelines") or [] if isinstance(p, dict)] or list(requested or [])
    updated = [slug for slug in registered if slug not in created]
    algorithms = list(answer.get("algorithms_created") or [])
    lines = [
        f"pipelines created ({len(created)}): {', '.join(created) or '-'}",
        f"pipelines updated ({len(updated)}): {', '.join(updated) or '-'}",
        f"algorithms created ({len(algorithms)}): {', '.join(algorithms) or '-'}",
    ]
    if answer.get("error"):
        lines.append(f"error: {answer['error']}")
    return "\n".join(lines)
