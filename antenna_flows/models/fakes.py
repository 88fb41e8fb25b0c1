"""Stand-ins for the published AMI files: real architectures with random (or crafted) weights
and made-up label maps, written under the published file names in the published formats.

Tests and benchmarks put these in a ``weights_dir`` and load them through the same code as
the real files, so nothing downloads and the loading path is exercised end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from antenna_flows.models.nets import build_classifier, build_detector
from antenna_flows.models.registry import ClassifierSpec, DetectorSpec, PipelineSpec

DEFAULT_CLASSES = 10


def labels_for(spec: ClassifierSpec, num_classes: int | None = None) -> list[str]:
    """``moth``/``nonmoth`` for the filter (upstream's labels), numbered names otherwise."""
    if spec.positive_label:
        return [spec.positive_label, f"non{spec.positive_label}"]
    count = num_classes or spec.num_classes or DEFAULT_CLASSES
    return [f"{spec.taxon_rank.title()} {i}" for i in range(count)]


def write_label_map(spec: ClassifierSpec, weights_dir: Path, labels: list[str]) -> Path:
    """Upstream's format: ``{label: index}``."""
    path = Path(weights_dir) / spec.labels.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({label: i for i, label in enumerate(labels)}), encoding="utf-8")
    return path


def write_weights(spec: ClassifierSpec | DetectorSpec, weights_dir: Path, module: nn.Module) -> Path:
    """Save ``module``'s state dict nested under ``model_state_dict``, like upstream checkpoints."""
    path = Path(weights_dir) / spec.weights.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": module.state_dict()}, path)
    return path


def write_random_model(spec: ClassifierSpec | DetectorSpec, weights_dir: Path, num_classes: int | None = None) -> None:
    """Random weights (and, for a classifier, a label map) for ``spec``."""
    if isinstance(spec, DetectorSpec):
        write_weights(spec, weights_dir, build_detector(spec))
        return
    labels = labels_for(spec, num_classes)
    write_label_map(spec, weights_dir, labels)
    write_weights(spec, weights_dir, build_classifier(spec, len(labels)))


def write_random_pipeline(pipeline: PipelineSpec, weights_dir: Path, num_classes: int | None = None) -> None:
    """Every file ``pipeline`` needs, skipping files already there (stages are shared)."""
    for stage in pipeline.stages:
        if not (Path(weights_dir) / stage.weights.filename).exists():
            write_random_model(stage, weights_dir, num_classes)
