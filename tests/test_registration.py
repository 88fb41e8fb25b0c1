"""Pipeline registration against the local Antenna API over real HTTP (DevStack: NATS + uvicorn)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from antenna_lab.antenna.devstack import DevStack
from antenna_flows.antenna_client import AntennaClient, AntennaError
from antenna_flows.models import fakes
from antenna_flows.models.registry import PIPELINES, pipeline_slugs, sim_pipeline_slugs
from antenna_flows.models.sim import SIM_CLASSIFIER, SIM_DETECTOR, SIM_LABEL, SimModel
from antenna_flows.models.base import UnknownPipeline
from antenna_flows.models.weights import MissingWeights
from antenna_flows.registration import (
    RegistrationFailed,
    build_pipeline_configs,
    declared_pipelines,
    full_service_name,
    register_pipelines,
    register_with_projects,
    summary,
)
from antenna_flows.schemas import PipelineConfigResponse
from tests.helpers import serve_http

SLUGS = ["panama_moths_2024", "moth_binary", "insect_orders_2025"]


@pytest.fixture(scope="module")
def label_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Label maps only: registration never needs the weights themselves."""
    root = tmp_path_factory.mktemp("labels")
    for slug in SLUGS:
        for stage in PIPELINES[slug].stages[1:]:
            fakes.write_label_map(stage, root, fakes.labels_for(stage, num_classes=7))
    return root


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with DevStack() as running:
        yield running


def test_configs_match_upstream_shape(label_dir: Path) -> None:
    panama, binary, orders = build_pipeline_configs(SLUGS, weights_dir=label_dir, allow_download=False)
    assert (panama.slug, panama.name, panama.version) == ("panama_moths_2024", "Panama Species Classifier - Apr 2024", 1)
    assert [a.key for a in panama.algorithms] == [
        "fasterrcnn_for_ami_moth_traps_2023", "moth_nonmoth_classifier", "panama_species_classifier_apr_2024"]
    assert [a.task_type for a in panama.algorithms] == ["localization", "classification", "classification"]
    detector, moth_filter, species = panama.algorithms
    assert detector.uri.endswith("/fasterrcnn_resnet50_fpn_tz53qv9v.pt") and detector.category_map.labels == []
    assert moth_filter.category_map.labels == ["moth", "nonmoth"]
    assert moth_filter.category_map.data[0] == {"index": 0, "label": "moth", "taxon_rank": "SUPERFAMILY"}
    assert species.category_map.labels == [f"Species {i}" for i in range(7)]
    assert species.category_map.uri == PIPELINES["panama_moths_2024"].classifier.labels.url
    assert [a.key for a in binary.algorithms] == ["fasterrcnn_for_ami_moth_traps_2023", "moth_nonmoth_classifier"]
    assert orders.algorithms[-1].category_map.data[0]["taxon_rank"] == "ORDER"


def test_missing_label_map_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MissingWeights, match="05-moth-nonmoth_category_map.json"):
        build_pipeline_configs(["moth_binary"], weights_dir=tmp_path, allow_download=False)


async def test_register_with_the_local_antenna(stack: DevStack, label_dir: Path) -> None:
    answer = await register_pipelines(stack.api_url, stack.token, 5, service_name="gpu-box", slugs=SLUGS,
                                      weights_dir=label_dir, allow_download=False)
    assert sorted(answer["pipelines_created"]) == sorted(SLUGS) and answer["success"] is True
    assert "moth_nonmoth_classifier" in answer["algorithms_created"] or stack.store.algorithm_keys(1, "moth_binary")
    stored = {p["slug"]: PipelineConfigResponse.model_validate(p) for p in stack.store.pipelines(5)}
    assert stored["panama_moths_2024"] == build_pipeline_configs(["panama_moths_2024"], weights_dir=label_dir,
                                                                 allow_download=False)[0]
    again = await register_pipelines(stack.api_url, stack.token, 5, service_name="gpu-box", slugs=SLUGS,
                                     weights_dir=label_dir, allow_download=False)
    assert again["pipelines_created"] == [] and again["algorithms_created"] == []
    assert "pipelines updated (3)" in summary(again, SLUGS) and "algorithms created (0)" in summary(again)
    assert len(summary(answer)) < 2000  # not the whole echo of every category map


async def test_register_sim_declares_pipelines_of_its_own(stack: DevStack) -> None:
    """``register --model-kind sim --pipeline moth_binary`` creates ``sim-moth_binary``: nothing sim
    declares touches a real pipeline (Antenna would refuse every later save of it)."""
    answer = await register_pipelines(stack.api_url, stack.token, 6, slugs=["moth_binary"], model_kind="sim")
    assert answer["pipelines_created"] == ["sim-moth_binary"]
    assert stack.store.algorithm_keys(6, "sim-moth_binary") == {SIM_DETECTOR.key, SIM_CLASSIFIER.key}
    assert stack.store.algorithm_keys(6, "moth_binary") == set()
    # a sim slug may be given either way; the default is every registry pipeline's sim twin
    assert [c.slug for c in declared_pipelines("sim", ["sim-panama_moths_2024", "moth_binary"])] == [
        "sim-panama_moths_2024", "sim-moth_binary"]
    assert [c.slug for c in declared_pipelines("sim")] == sim_pipeline_slugs() == [f"sim-{s}" for s in pipeline_slugs()]


def test_sim_declares_a_category_map_and_names_no_real_pipeline() -> None:
    """Antenna refuses a classification algorithm without a category map (500 PipelineNotConfigured),
    and finds an existing pipeline by slug *or* by (name, version): sim's names must be its own."""
    real_names = {(spec.name, spec.version) for spec in PIPELINES.values()}
    for config in declared_pipelines("sim"):
        assert config.slug.startswith("sim-") and (config.name, config.version) not in real_names
        detector, classifier = config.algorithms
        assert (detector.key, detector.task_type) == (SIM_DETECTOR.key, "localization")
        assert detector.category_map is not None and detector.category_map.labels == []
        assert (classifier.key, classifier.task_type) == (SIM_CLASSIFIER.key, "classification")
        assert classifier.category_map is not None and classifier.category_map.labels == [SIM_LABEL]
        assert classifier.category_map.data == [{"index": 0, "label": SIM_LABEL, "taxon_rank": "SPECIES"}]
    with pytest.raises(KeyError, match="unknown pipeline"):
        declared_pipelines("sim", ["no_such_pipeline"])


def test_the_sim_model_serves_only_its_own_pipelines() -> None:
    model = SimModel()
    assert model.pipelines() == sim_pipeline_slugs()
    model.load("sim-panama_moths_2024")
    with pytest.raises(UnknownPipeline, match="did you mean sim-panama_moths_2024"):
        model.load("panama_moths_2024")


def test_ami_declarations_without_category_maps_need_no_label_files() -> None:
    [config] = declared_pipelines("ami", ["panama_moths_2024"], category_maps=False)
    assert [a.key for a in config.algorithms] == [
        "fasterrcnn_for_ami_moth_traps_2023", "moth_nonmoth_classifier", "panama_species_classifier_apr_2024"]
    assert all(a.category_map is None for a in config.algorithms)


async def test_bad_token_is_reported(stack: DevStack, label_dir: Path) -> None:
    with pytest.raises(RegistrationFailed, match="HTTP 401") as refused:
        await register_pipelines(stack.api_url, "wrong", 5, slugs=["moth_binary"], weights_dir=label_dir, allow_download=False)
    assert isinstance(refused.value, AntennaError) and refused.value.status == 401


def test_service_name_has_the_hostname() -> None:
    assert full_service_name("lab") == f"lab ({socket.gethostname()})"
    assert full_service_name() == f"antenna-flows ({socket.gethostname()})"


# --- every accessible project, as upstream's `ami worker register` ---------------------------------


async def test_register_with_every_project_the_token_sees(stack_factory) -> None:
    stack = stack_factory(register_kinds=())
    for project_id in (7, 9):
        stack.store.ensure_project(project_id, f"Site {project_id}")
    report = await register_with_projects(stack.api_url, stack.token, None, "lab box", ["moth_binary"], model_kind="sim")
    assert report.ok and report.service_name == f"lab box ({socket.gethostname()})"
    assert [(o.project_id, o.status) for o in report.outcomes] == [(1, "registered"), (7, "registered"), (9, "registered")]
    assert all(stack.store.algorithm_keys(p, "sim-moth_binary") == {SIM_DETECTOR.key, SIM_CLASSIFIER.key}
               for p in (1, 7, 9))
    assert "project 7 (Site 7): registered" in report.text() and "3 registered, 0 skipped, 0 failed" in report.text()
    named = await register_with_projects(stack.api_url, stack.token, [9], None, ["moth_binary"], model_kind="sim")
    assert [(o.project_id, o.status) for o in named.outcomes] == [(9, "registered")]


async def test_projects_are_read_page_by_page(stack_factory) -> None:
    stack = stack_factory(register_kinds=())
    for project_id in range(2, 26):
        stack.store.ensure_project(project_id)
    async with AntennaClient(stack.api_url, stack.token) as client:
        projects = await client.list_projects(page_size=10)
    assert [p["id"] for p in projects] == list(range(1, 26))


class _ProjectsHandler(BaseHTTPRequestHandler):
    """An Antenna whose token sees two projects and may register with the first only (403 on the second)."""

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        rows = [{"id": 11, "name": "Mine"}, {"id": 12, "name": "Someone else's public project"}]
        self._answer(200, {"count": 2, "next": None, "previous": None, "results": rows})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/api/v2/projects/11/"):
            self._answer(201, {"success": True, "pipelines_created": ["sim-moth_binary"], "algorithms_created": []})
        else:
            self._answer(403, {"detail": "You do not have permission to perform this action."})


@pytest.fixture
def picky_antenna() -> Iterator[str]:
    server = serve_http(_ProjectsHandler)
    yield f"{next(server)}/api/v2"
    server.close()


async def test_a_listed_project_that_refuses_the_token_is_skipped(picky_antenna: str) -> None:
    report = await register_with_projects(picky_antenna, "t", None, None, ["moth_binary"], model_kind="sim")
    assert [(o.project_id, o.status) for o in report.outcomes] == [(11, "registered"), (12, "skipped")]
    assert report.ok and "may not register pipelines here" in report.outcomes[1].detail
    named = await register_with_projects(picky_antenna, "t", [12], None, ["moth_binary"], model_kind="sim")
    assert [(o.project_id, o.status) for o in named.outcomes] == [(12, "failed")] and not named.ok
