"""The registry matches the upstream AMI worker's pipeline table (slugs, models, keys, files)."""

from __future__ import annotations

import pytest

from antenna_flows.models.registry import (
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_STORE,
    PIPELINES,
    get_pipeline,
    pipeline_slugs,
    slugify,
)

SPECIES_2024 = {"panama_moths_2024": 636, "quebec_vermont_moths_2023": 2497, "uk_denmark_moths_2023": 2603,
                "global_moths_2024": 29176}
TURING = ("costa_rica_moths_turing_2024", "anguilla_moths_turing_2024", "kenya-uganda_moths_turing_2024")


def test_slugs_are_the_upstream_ones() -> None:
    assert set(pipeline_slugs()) == {"panama_moths_2023", *SPECIES_2024, *TURING, "moth_binary", "insect_orders_2025"}
    assert pipeline_slugs() == list(PIPELINES)
    assert all(spec.slug == slug for slug, spec in PIPELINES.items())
    with pytest.raises(KeyError, match="unknown pipeline 'nope'"):
        get_pipeline("nope")


def test_keys_follow_upstream_slugify() -> None:
    assert slugify("Moth / Non-Moth Classifier") == "moth_nonmoth_classifier"
    assert slugify("FasterRCNN for AMI Moth Traps 2023") == "fasterrcnn_for_ami_moth_traps_2023"
    assert slugify("Quebec & Vermont Species Classifier - Apr 2024") == "quebec_vermont_species_classifier_apr_2024"
    assert PIPELINES["insect_orders_2025"].classifier.key == "insect_order_classifier"


def test_shared_detector_and_filter() -> None:
    detector = PIPELINES["moth_binary"].detector
    assert (detector.score_threshold, detector.max_detections, detector.min_size, detector.max_size) == (0.8, 500, 800, 1333)
    assert all(p.detector == detector for p in PIPELINES.values())
    for slug, spec in PIPELINES.items():
        filtered = slug not in ("moth_binary", "insect_orders_2025")
        assert (spec.binary is not None) == filtered
        assert len(spec.stages) == (3 if filtered else 2)
    binary = PIPELINES["moth_binary"].classifier
    assert (binary.architecture, binary.input_size, binary.mean, binary.std) == ("torchvision_resnet50", 128, IMAGENET_MEAN, IMAGENET_STD)
    assert binary.positive_label == "moth" and PIPELINES["panama_moths_2024"].binary == binary


def test_classifiers_match_upstream() -> None:
    for slug, classes in SPECIES_2024.items():
        c = PIPELINES[slug].classifier
        assert (c.architecture, c.input_size, c.mean, c.num_classes) == ("timm_resnet50", 128, IMAGENET_MEAN, classes)
    for slug in TURING:
        c = PIPELINES[slug].classifier
        assert (c.architecture, c.input_size, c.mean, c.std) == ("turing_resnet50", 300, HALF, HALF)
    orders = PIPELINES["insect_orders_2025"].classifier
    assert (orders.architecture, orders.num_classes, orders.taxon_rank) == ("timm_convnext_tiny", 16, "ORDER")
    assert PIPELINES["moth_binary"].name == "Moth / Non-Moth Classifier"


def test_files_live_in_the_model_store_under_unique_names() -> None:
    files = {f for p in PIPELINES.values() for s in p.stages for f in ([s.weights] + ([s.labels] if hasattr(s, "labels") else []))}
    assert all(f.url.startswith(MODEL_STORE + "/") and f.filename == f.url.rsplit("/", 1)[1] for f in files)
    assert len({f.filename for f in files}) == len(files)
    assert PIPELINES["panama_moths_2024"].classifier.weights.filename == "panama_resnet50_baseline_20240417_edbb46dd.pth"
