"""Pipeline registration against the local Antenna API over real HTTP (DevStack: NATS + uvicorn)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from antenna_lab.antenna.devstack import DevStack
from antenna_flows.models import fakes
from antenna_flows.models.registry import PIPELINES
from antenna_flows.models.weights import MissingWeights
from antenna_flows.antenna_client import AntennaError
from antenna_flows.models.sim import SIM_CLASSIFIER, SIM_DETECTOR
from antenna_flows.registration import (
    RegistrationFailed,
    build_pipeline_configs,
    declared_pipelines,
    full_service_name,
    register_pipelines,
    summary,
)
from antenna_flows.schemas import PipelineConfigResponse

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


async def test_register_sim_declares_the_sim_algorithms(stack: DevStack) -> None:
    """A staging fleet running ``sim`` against a real Antenna registers what its results name (no label maps)."""
    answer = await register_pipelines(stack.api_url, stack.token, 6, slugs=["moth_binary"], model_kind="sim")
    assert answer["pipelines_created"] == ["moth_binary"]
    assert stack.store.algorithm_keys(6, "moth_binary") == {SIM_DETECTOR.key, SIM_CLASSIFIER.key}
    assert [a.key for a in declared_pipelines("sim", ["panama_moths_2024"])[0].algorithms] == [
        SIM_DETECTOR.key, SIM_CLASSIFIER.key]


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
