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
- ``sim``: pipelines of its own, ``sim-<slug>`` named "Simulated (...)", with the simulated
  detector and classifier (a category map of one label: Antenna refuses a classification
  algorithm without one). Nothing sim declares touches a real pipeline: Antenna finds an
  existing pipeline by slug or by (name, version), and sim algorithms on a real pipeline
  (beside its real detector) would make it refuse every save.

``category_maps=False`` declares the ami algorithms by name and key only (the local devstack's
pre-registration, which needs no label files). Sent with :class:`AntennaClient`.

As upstream (``ami worker register``), the service is named ``"{name} ({hostname})"`` and,
with no project named, registers with every project the token can see (``GET /projects/``):
:func:`register_with_projects`. A project that refuses the token (403) is skipped when it was
only listed, a failure when it was named.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from antenna_flows.antenna_client import AntennaClient, AntennaError, AuthError
from antenna_flows.models.registry import (
    ClassifierSpec,
    DetectorSpec,
    PipelineSpec,
    get_pipeline,
    pipeline_slugs,
    sim_pipeline_name,
    sim_slug,
)
from antenna_flows.models.weights import load_label_map, resolve
from antenna_flows.schemas import (
    AlgorithmCategoryMapResponse,
    AlgorithmConfigResponse,
    PipelineConfigResponse,
)
from antenna_flows.settings import DEFAULT_SERVICE_NAME, WorkerSettings

log = logging.getLogger(__name__)
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
    """What the ``sim`` model's results name (``antenna_flows.models.sim``), with the category maps
    Antenna requires: an empty one for the detector (as upstream sends), one label for the classifier."""
    from antenna_flows.models.sim import SIM_CLASSIFIER, SIM_DETECTOR, SIM_LABEL, SIM_TAXON_RANK

    return [
        AlgorithmConfigResponse(name=SIM_DETECTOR.name, key=SIM_DETECTOR.key, task_type="localization",
                                description="Timed stand-in for the detector (antenna-flows sim model).",
                                category_map=AlgorithmCategoryMapResponse(data=[], labels=[])),
        AlgorithmConfigResponse(name=SIM_CLASSIFIER.name, key=SIM_CLASSIFIER.key, task_type="classification",
                                description="Timed stand-in for the classifiers (antenna-flows sim model).",
                                category_map=AlgorithmCategoryMapResponse(
                                    data=[{"index": 0, "label": SIM_LABEL, "taxon_rank": SIM_TAXON_RANK}],
                                    labels=[SIM_LABEL])),
    ]


def sim_pipeline_config(slug: str) -> PipelineConfigResponse:
    """The sim pipeline standing in for registry pipeline ``slug`` (``x`` or ``sim-x``): ``sim-x``."""
    own = sim_slug(slug)
    spec = get_pipeline(own.removeprefix("sim-"))
    return PipelineConfigResponse(
        name=sim_pipeline_name(own), slug=own, version=spec.version,
        description=f"antenna-flows sim model standing in for {spec.slug} (timed, no real inference).",
        algorithms=sim_algorithms(),
    )


def declared_pipelines(
    model_kind: ModelKind,
    slugs: list[str] | None = None,
    *,
    weights_dir: Path | None = None,
    allow_download: bool | None = None,
    category_maps: bool = True,
) -> list[PipelineConfigResponse]:
    """The pipelines (default: every registry pipeline) with the algorithms ``model_kind`` declares.

    For ``sim``: the ``sim-<slug>`` pipelines (``slugs`` may name them either way)."""
    if model_kind == "sim":
        return [sim_pipeline_config(slug) for slug in (slugs or pipeline_slugs())]
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


@dataclass
class ProjectOutcome:
    """What registering with one project came to: ``registered``, ``skipped`` (a listed project
    that does not let this token register) or ``failed``."""

    project_id: int
    name: str
    status: Literal["registered", "skipped", "failed"]
    detail: str
    answer: dict[str, Any] | None = None


@dataclass
class RegistrationReport:
    service_name: str
    model_kind: str
    pipelines: list[str]
    outcomes: list[ProjectOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Registered somewhere, and failed nowhere."""
        return any(o.status == "registered" for o in self.outcomes) and not any(o.status == "failed" for o in self.outcomes)

    def text(self) -> str:
        lines = [f"service {self.service_name!r}, model kind {self.model_kind}, pipelines {', '.join(self.pipelines)}"]
        for o in self.outcomes:
            lines.append(f"project {o.project_id} ({o.name}): {o.status}: {o.detail}")
        counts = {s: sum(o.status == s for o in self.outcomes) for s in ("registered", "skipped", "failed")}
        lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
        return "\n".join(lines)


async def register_with_projects(
    api_url: str,
    token: str,
    projects: list[int] | None = None,
    service_name: str | None = None,
    slugs: list[str] | None = None,
    *,
    model_kind: ModelKind = "ami",
    weights_dir: Path | None = None,
    allow_download: bool | None = None,
) -> RegistrationReport:
    """Register the pipelines ``model_kind`` declares with each of ``projects``, or, when None or
    empty, with every project the token can see (``GET /projects/``), as upstream does.

    Raises :class:`RegistrationFailed` when the projects cannot be listed or none is visible;
    per-project outcomes are in the report (``report.ok``: registered somewhere, failed nowhere).
    """
    configs = declared_pipelines(model_kind, slugs, weights_dir=weights_dir, allow_download=allow_download)
    name = full_service_name(service_name)
    report = RegistrationReport(name, model_kind, [c.slug for c in configs])
    async with AntennaClient(api_url, token, timeout_s=TIMEOUT_S) as client:
        named = bool(projects)
        if named:
            targets = [(int(pid), f"Project {pid}") for pid in dict.fromkeys(projects or [])]
        else:
            try:
                listed = await client.list_projects()
            except AntennaError as exc:
                raise RegistrationFailed(f"cannot list the projects of this token: {exc}", exc.status, exc.body) from exc
            targets = [(int(p["id"]), str(p.get("name") or f"Project {p['id']}")) for p in listed if "id" in p]
            if not targets:
                raise RegistrationFailed(f"the token sees no project at {api_url}: name one with --project")
            log.info("registering with every project the token can see: %s", ", ".join(str(t[0]) for t in targets))
        for project_id, project_name in targets:
            try:
                answer = await client.register_pipelines(project_id, name, configs)
            except AuthError as exc:
                status: Literal["skipped", "failed"] = "failed" if named or exc.status == 401 else "skipped"
                why = "the token may not register pipelines here" if exc.status == 403 else "the token was refused"
                report.outcomes.append(ProjectOutcome(project_id, project_name, status, f"{why} ({exc})"))
                continue
            except AntennaError as exc:
                if exc.status is None and isinstance(exc.__cause__, httpx.TransportError):  # Antenna is unreachable
                    raise RegistrationFailed(f"cannot reach Antenna at {api_url}: {exc}") from exc
                report.outcomes.append(ProjectOutcome(project_id, project_name, "failed", str(exc)))
                continue
            report.outcomes.append(
                ProjectOutcome(project_id, project_name, "registered", summary(answer, report.pipelines).replace("\n", "; "), answer)
            )
    return report


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
