"""Pipeline registry: Antenna pipeline slug -> the models it runs, their weights and label maps.

Mirrors the upstream AMI worker (RolnickLab/ami-data-companion, ``trapdata/api/api.py``
``CLASSIFIER_CHOICES`` and ``trapdata/ml/models/*.py``): names, keys, URLs, input sizes and
normalisations are the upstream ones, so results and registrations look exactly like an
upstream deployment's and the published weight files load as they are.

Plain dataclasses only (no torch, no pydantic): the scheduler, registration and the GPU
benchmark read this without importing the heavy stack.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal

MODEL_STORE = "https://object-arbutus.cloud.computecanada.ca/ami-models"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

Architecture = Literal["torchvision_resnet50", "timm_resnet50", "turing_resnet50", "timm_convnext_tiny"]


def slugify(name: str) -> str:
    """Upstream's algorithm key from its name (``trapdata.common.utils.slugify``), kept identical
    because Antenna matches classifications to registered algorithms by key."""
    sep = "_"
    allowed = set(string.ascii_letters + string.digits + sep)
    kept = "".join(c for c in name.replace(" ", sep).lower() if c in allowed)
    return kept.strip(sep).replace(sep * 2, sep)


@dataclass(frozen=True)
class RemoteFile:
    """A published file; cached locally under its URL's basename, as upstream does."""

    url: str
    sha256: str | None = None  # checked when known; the model store publishes none

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DetectorSpec:
    """torchvision Faster R-CNN ResNet-50 FPN (v1), 2 classes; images go in whole (ToTensor only)
    and torchvision's transform resizes them to ``min_size``..``max_size``."""

    name: str
    description: str
    weights: RemoteFile
    score_threshold: float = 0.80
    max_detections: int = 500
    min_size: int = 800
    max_size: int = 1333
    task_type: str = "localization"

    @property
    def key(self) -> str:
        return slugify(self.name)


@dataclass(frozen=True)
class ClassifierSpec:
    """A crop classifier: the crop is resized (bilinear, antialiased) to ``input_size`` square,
    scaled to [0, 1] and normalised with ``mean``/``std``; class count comes from the label map."""

    name: str
    description: str
    architecture: Architecture
    weights: RemoteFile
    labels: RemoteFile
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int | None = None  # as published; None where upstream does not say
    taxon_rank: str = "SPECIES"
    positive_label: str | None = None  # binary filters: the label that passes a crop on
    task_type: str = "classification"

    @property
    def key(self) -> str:
        return slugify(self.name)


@dataclass(frozen=True)
class PipelineSpec:
    """What one Antenna pipeline runs: detector, optional moth/non-moth filter, terminal classifier."""

    slug: str
    detector: DetectorSpec
    classifier: ClassifierSpec
    binary: ClassifierSpec | None = None
    version: int = 1

    @property
    def name(self) -> str:
        return self.classifier.name

    @property
    def description(self) -> str:
        return self.classifier.description

    @property
    def stages(self) -> list[DetectorSpec | ClassifierSpec]:
        return [self.detector, *([self.binary] if self.binary else []), self.classifier]


def _classification(filename: str) -> str:
    return f"{MODEL_STORE}/moths/classification/{filename}"


DETECTOR = DetectorSpec(
    name="FasterRCNN for AMI Moth Traps 2023",
    description="Model trained on GBIF images and synthetic data in 2023. Accurate but can be slow on a machine without GPU.",
    weights=RemoteFile(f"{MODEL_STORE}/moths/localization/fasterrcnn_resnet50_fpn_tz53qv9v.pt"),
)

MOTH_BINARY = ClassifierSpec(
    name="Moth / Non-Moth Classifier",
    description="Trained on April 17, 2024",
    architecture="torchvision_resnet50",
    weights=RemoteFile(_classification("moth-nonmoth_resnet50_20240417_b4fe3efe.pth")),
    labels=RemoteFile(_classification("05-moth-nonmoth_category_map.json")),
    input_size=128,
    num_classes=2,
    taxon_rank="SUPERFAMILY",
    positive_label="moth",
)


def _gbif_resnet(name: str, description: str, weights: str, labels: str, num_classes: int) -> ClassifierSpec:
    """The 2024 AMI-GBIF species models: timm ResNet-50 at 128 px, ImageNet normalisation."""
    return ClassifierSpec(
        name=name,
        description=description,
        architecture="timm_resnet50",
        weights=RemoteFile(_classification(weights)),
        labels=RemoteFile(_classification(labels)),
        input_size=128,
        num_classes=num_classes,
    )


def _turing(name: str, description: str, weights: str, labels: str) -> ClassifierSpec:
    """The Turing 2024 models: torchvision ResNet-50 trunk + bias-free head, 300 px, mean/std 0.5."""
    return ClassifierSpec(
        name=name,
        description=description,
        architecture="turing_resnet50",
        weights=RemoteFile(_classification(weights)),
        labels=RemoteFile(_classification(labels)),
        input_size=300,
        mean=HALF,
        std=HALF,
    )


SPECIES: dict[str, ClassifierSpec] = {
    # upstream MothClassifierPanama = PanamaMothSpeciesClassifierMixedResolution2023 on
    # Resnet50ClassifierLowRes: torchvision ResNet-50 (fc replaced), 128 px, ImageNet normalisation
    "panama_moths_2023": ClassifierSpec(
        name="Panama Species Classifier 2023",
        description="Trained on November 11th, 2023 using a corrected species list of 1060 classes.",
        architecture="torchvision_resnet50",
        weights=RemoteFile(_classification("panama_resetnet50_best_5aeb515a.pth")),
        labels=RemoteFile(_classification("03_moths_centralAmerica_category_map-202311110-with-names.json")),
        input_size=128,
        num_classes=1060,
    ),
    "panama_moths_2024": _gbif_resnet(
        "Panama Species Classifier - Apr 2024",
        "Trained on April 17, 2024 for 636 species. https://wandb.ai/moth-ai/ami-gbif-fine-grained/runs/1sekgkan/overview",
        "panama_resnet50_baseline_20240417_edbb46dd.pth",
        "03_ami-gbif_fine-grained_c-america_category_map-with_names.json",
        636,
    ),
    "quebec_vermont_moths_2023": _gbif_resnet(
        "Quebec & Vermont Species Classifier - Apr 2024",
        "Trained on April 17, 2024 for 2,497 species. https://wandb.ai/moth-ai/ami-gbif-fine-grained/runs/1x53zmp2/overview",
        "quebec-vermont_resnet50_baseline_20240417_950de764.pth",
        "01_ami-gbif_fine-grained_ne-america_category_map-with_names.json",
        2497,
    ),
    "uk_denmark_moths_2023": _gbif_resnet(
        "UK & Denmark Species Classifier - Apr 2024",
        "Trained on April 17, 2024 for 2,603 species. https://wandb.ai/moth-ai/ami-gbif-fine-grained/runs/x5u7jcbf/overview",
        "uk-denmark_resnet50_baseline_20240417_55250a8b.pth",
        "02_ami-gbif_fine-grained_w-europe_category_map-with_names.json",
        2603,
    ),
    "costa_rica_moths_turing_2024": _turing(
        "Turing Costa Rica Species Classifier",
        "Trained on 4th June 2024 by Turing team using Resnet50 model.",
        "turing-costarica_v03_resnet50_2024-06-04-16-17_state.pt",
        "03_costarica_data_category_map.json",
    ),
    "anguilla_moths_turing_2024": _turing(
        "Turing Anguilla Species Classifier",
        "Trained on 28th June 2024 by Turing team using Resnet50 model.",
        "turing-anguilla_v01_resnet50_2024-06-28-17-01_state.pt",
        "01_anguilla_data_category_map.json",
    ),
    "kenya-uganda_moths_turing_2024": _turing(
        "Turing Kenya and Uganda Species Classifier",
        "Trained on 19th November 2024 by Turing team using Resnet50 model.",
        "turing-kenya-uganda_v01_resnet50_2024-11-19-18-44_state.pt",
        "01_kenya-uganda_data_category_map.json",
    ),
    "global_moths_2024": _gbif_resnet(
        "Global Species Classifier - Aug 2024",
        "Trained on August 28th, 2024 for 29,176 species. https://wandb.ai/moth-ai/global-moth-classifier/runs/h0cuqrbc/overview",
        "global_resnet50_20240828_b06d3b3a.pth",
        "global_category_map_with_names_20240828.json",
        29176,
    ),
}

INSECT_ORDERS = ClassifierSpec(
    name="Insect Order Classifier",
    description="ConvNeXt-T based insect order classifier for 16 classes trained by Mila in January 2025",
    architecture="timm_convnext_tiny",
    weights=RemoteFile(f"{MODEL_STORE}/insect_orders/convnext_tiny_in22k_worder0.5_wbinary0.5_run2_checkpoint.pt"),
    labels=RemoteFile(f"{MODEL_STORE}/insect_orders/insect_order_category_map.json"),
    input_size=128,
    num_classes=16,
    taxon_rank="ORDER",
)

# Upstream order; species pipelines run the moth filter first, the two others do not
# (upstream ``should_filter_detections``).
PIPELINES: dict[str, PipelineSpec] = {
    **{slug: PipelineSpec(slug, DETECTOR, spec, binary=MOTH_BINARY) for slug, spec in SPECIES.items()},
    "moth_binary": PipelineSpec("moth_binary", DETECTOR, MOTH_BINARY),
    "insect_orders_2025": PipelineSpec("insect_orders_2025", DETECTOR, INSECT_ORDERS),
}


def pipeline_slugs() -> list[str]:
    return list(PIPELINES)


def get_pipeline(slug: str) -> PipelineSpec:
    """The spec of ``slug``; KeyError (naming the known slugs) if there is none."""
    try:
        return PIPELINES[slug]
    except KeyError:
        raise KeyError(f"unknown pipeline {slug!r}; known: {', '.join(PIPELINES)}") from None


# --- the sim model's own pipelines --------------------------------------------------------------
# The timed stand-in (models/sim.py) serves pipelines of its own, one per registry pipeline, never
# a real one: Antenna refuses results naming algorithms a pipeline has not registered, and a
# pipeline with two detection algorithms refuses every save, so sim algorithms declared on a real
# pipeline would break it. Their names differ from the real ones too: Antenna's registration finds
# an existing pipeline by slug *or* by (name, version).

SIM_PREFIX = "sim-"


def sim_slug(slug: str) -> str:
    """``sim-<slug>`` for a registry slug (a sim slug is returned as it is); KeyError for an unknown one."""
    real = slug.removeprefix(SIM_PREFIX)
    get_pipeline(real)
    return f"{SIM_PREFIX}{real}"


def sim_pipeline_slugs() -> list[str]:
    return [f"{SIM_PREFIX}{slug}" for slug in PIPELINES]


def is_sim_slug(slug: str) -> bool:
    return slug.startswith(SIM_PREFIX) and slug.removeprefix(SIM_PREFIX) in PIPELINES


def sim_pipeline_name(slug: str) -> str:
    """The display name of a sim pipeline: never the name of a real one."""
    return f"Simulated ({get_pipeline(slug.removeprefix(SIM_PREFIX)).name})"
