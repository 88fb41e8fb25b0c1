"""The AMI pipeline in torch for one batch: detector -> moth filter -> terminal classifier.

Every stage sees the whole batch at once: one detector call over all images (torchvision's
transform resizes each image and pads the batch, so mixed sizes are fine), then every crop of
the batch through each classifier in as few calls as memory allows. Convolutions run
channels-last (faster on GPUs and on CPUs alike); on CUDA the heavy modules run in bf16 (fp16
where bf16 is missing) while box arithmetic stays fp32.
Each stage is timed (synchronising the device at stage ends, where results are read back
anyway), so callers can report where a batch's time goes.

Plain torch only (no pydantic): ``AmiModel`` turns :class:`BatchOutput` into Antenna's schema,
and ``deployments/gpu_bench.py`` drives this module directly on machines without pydantic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from antenna_flows.models import crops as crop_ops
from antenna_flows.models.nets import build_classifier, build_detector, prepare_for_inference
from antenna_flows.models.registry import ClassifierSpec, DetectorSpec
from antenna_flows.models.weights import load_label_map, load_state_dict, resolve

log = logging.getLogger(__name__)

STAGES = ("prepare", "detect", "crop", "binary", "classify")


@dataclass
class LoadedDetector:
    spec: DetectorSpec
    module: nn.Module


@dataclass
class LoadedClassifier:
    spec: ClassifierSpec
    labels: list[str]
    module: nn.Module

    @property
    def positive_index(self) -> int | None:
        return self.labels.index(self.spec.positive_label) if self.spec.positive_label else None


@dataclass
class StageOutput:
    """Classifier outputs for a set of crops, on the CPU: raw logits and softmax scores."""

    logits: torch.Tensor
    scores: torch.Tensor


@dataclass
class BatchOutput:
    """Everything one batch produced, indexed by detection row.

    ``image_index[r]``/``boxes[r]``: the image and integer box of detection ``r`` (degenerate
    boxes already dropped); ``binary``: the moth filter's outputs for every row (None when the
    pipeline has no filter); ``classified``: the rows the terminal classifier saw (all rows
    without a filter, the moths with one) and ``terminal`` its outputs in that order.
    """

    image_index: torch.Tensor
    boxes: torch.Tensor
    binary: StageOutput | None
    classified: torch.Tensor
    terminal: StageOutput
    dropped: int
    timings: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` (first GPU if any, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unsupported device {name!r} (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r} (auto, cpu, cuda, cuda:N)")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32 (always on CPU)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def as_chw_uint8(image: Any) -> torch.Tensor:
    """An RGB PIL image, or a (3, H, W) uint8 tensor (torchvision.io's decode output, passed
    through), as a (3, H, W) uint8 tensor; PIL's pixels stay interleaved in memory."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) uint8 image tensor, got {image.dtype} {tuple(image.shape)}")
        return image
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class Engine:
    """Loads the AMI models onto one device and runs batches through them."""

    def __init__(self, weights_dir: Path, *, device: str = "auto", precision: str = "auto",
                 allow_download: bool = False, channels_last: bool = True, classify_chunk: int = 256,
                 batched_crops: bool | None = None):
        self.weights_dir = Path(weights_dir).expanduser()
        self.allow_download = allow_download
        self.device = resolve_device(device)
        # Autocast dtype of models loaded from now on (None: fp32). Set from ``precision`` (CUDA
        # only); tests set it on a CPU engine to check the GPU's reduced precision against fp32.
        self.dtype = resolve_precision(precision, self.device)
        self.channels_last = channels_last  # faster on CUDA and on CPU (oneDNN) alike
        self.classify_chunk = classify_chunk
        self.batched_crops = batched_crops  # crop_and_resize's matmul path; None: on CUDA only
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    # --- loading -------------------------------------------------------------------

    def load_detector(self, spec: DetectorSpec) -> LoadedDetector:
        path = resolve(spec.weights, self.weights_dir, allow_download=self.allow_download,
                       what=f"weights of {spec.name!r}")
        module = build_detector(spec)
        module.load_state_dict(load_state_dict(path))
        return LoadedDetector(spec, prepare_for_inference(module, spec, self.device, self.dtype, self.channels_last))

    def load_classifier(self, spec: ClassifierSpec) -> LoadedClassifier:
        labels_path = resolve(spec.labels, self.weights_dir, allow_download=self.allow_download,
                              what=f"label map of {spec.name!r}")
        labels = load_label_map(labels_path)
        if spec.positive_label and spec.positive_label not in labels:
            raise ValueError(f"{labels_path}: no {spec.positive_label!r} label for the {spec.name!r} filter")
        if spec.num_classes and spec.num_classes != len(labels):
            log.warning("%s has %d classes, %s says %d", labels_path, len(labels), spec.name, spec.num_classes)
        path = resolve(spec.weights, self.weights_dir, allow_download=self.allow_download,
                       what=f"weights of {spec.name!r}")
        module = build_classifier(spec, len(labels))
        module.load_state_dict(load_state_dict(path))
        return LoadedClassifier(spec, labels, prepare_for_inference(module, spec, self.device, self.dtype, self.channels_last))

    # --- stages --------------------------------------------------------------------

    def host_tensor(self, image: Any) -> torch.Tensor:
        """An image as the (3, H, W) uint8 host tensor the device copy starts from (pinned for a
        GPU). Converting a 4K PIL image costs ~50 ms of CPU, most of the "prepare" stage:
        callers should do it off the inference thread, where images are decoded, and pass the
        tensor instead (decoding straight to a tensor with torchvision.io is cheaper still)."""
        tensor = as_chw_uint8(image)
        if self.device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor

    def decode(self, data: bytes) -> torch.Tensor | None:
        """JPEG bytes straight to the (3, H, W) uint8 RGB host tensor :meth:`host_tensor` makes
        (pinned for a GPU), or None when ``data`` is not a JPEG (the caller falls back to PIL).

        torchvision's libjpeg-turbo decoder writes the planar tensor directly: on a 4K frame
        ~50 ms of CPU against ~160 ms for PIL's decode plus the interleaved-to-planar copy, which
        is what lets loader threads keep a GPU fed (see ``deployments/gpu_bench.py --feed``).
        Raises (RuntimeError) on corrupt or truncated data; callers turn that into a per-image
        error. Thread-safe: called from loader threads. (torchvision 0.29 deprecates its image
        codecs in favour of TorchCodec; they still work, and only warn with DeprecationWarning.)
        """
        if not data.startswith(b"\xff\xd8"):
            return None
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415

        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # bytearray: frombuffer wants writable memory
        return self.host_tensor(decode_jpeg(raw, mode=ImageReadMode.RGB))

    def to_device(self, images: list[Any]) -> list[torch.Tensor]:
        """(3, H, W) uint8 tensors on the device; on CUDA the copies are asynchronous from pinned
        memory, so each overlaps the conversion of the next image."""
        return [self.host_tensor(image).to(self.device, non_blocking=True) for image in images]

    def detect(self, detector: LoadedDetector, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the (k, 4) int64 CPU boxes scoring above the threshold.

        Images go in whole as [0, 1] floats (upstream's ToTensor); boxes come back in original
        pixels and are truncated to integers, as upstream stores and crops them.
        """
        inputs = [im.float().div_(255.0) for im in images]
        outputs = detector.module(inputs)
        kept = [o["boxes"][o["scores"] > detector.spec.score_threshold] for o in outputs]
        counts = [len(k) for k in kept]
        boxes = torch.cat(kept).cpu().to(torch.int64) if kept else torch.empty((0, 4), dtype=torch.int64)
        return list(boxes.split(counts))

    def classify(self, classifier: LoadedClassifier, crops: torch.Tensor) -> StageOutput:
        """Logits and softmax scores (CPU, float32, C-contiguous) for (n, 3, S, S) normalised crops.

        Both leave the device in one copy for the whole batch (never per crop): results are
        built from row views of these arrays and serialised from them as they are."""
        if len(crops) == 0:
            empty = torch.empty((0, len(classifier.labels)))
            return StageOutput(empty, empty)
        logits = torch.cat([classifier.module(chunk) for chunk in crops.split(self.classify_chunk)]).float()
        both = torch.stack((logits, torch.softmax(logits, dim=1))).cpu()
        return StageOutput(both[0], both[1])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- one batch -------------------------------------------------------------------

    def run(self, images: list[Any], classifier: LoadedClassifier, *, detector: LoadedDetector | None = None,
            binary: LoadedClassifier | None = None, boxes: list[torch.Tensor] | None = None) -> BatchOutput:
        """Run one batch. ``boxes`` (per image, (k, 4) pixels) skips the detector."""
        timings = dict.fromkeys(STAGES, 0.0)
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            self._sync()
            now = time.perf_counter()
            timings[stage] += now - clock
            clock = now

        with torch.inference_mode():
            on_device = self.to_device(images)
            lap("prepare")
            if boxes is None:
                if detector is None:
                    raise ValueError("either a detector or boxes are needed")
                boxes = self.detect(detector, on_device)
                lap("detect")
            image_index, flat, dropped = _valid_boxes(boxes, [im.shape[1:] for im in on_device])
            batch = crop_ops.stack_images([im.permute(1, 2, 0) for im in on_device]) if len(flat) else None

            def crops_for(rows: torch.Tensor, spec: ClassifierSpec) -> torch.Tensor:
                if batch is None or len(rows) == 0:
                    return torch.empty((0, 3, spec.input_size, spec.input_size))
                return crop_ops.crop_and_resize(batch, image_index[rows], flat[rows], spec.input_size, spec.mean, spec.std,
                                                batched=self.batched_crops)

            classified = torch.arange(len(flat))
            crops = crops_for(classified, (binary or classifier).spec)
            lap("crop")
            binary_out = None
            if binary is not None:
                binary_out = self.classify(binary, crops)
                lap("binary")
                classified = torch.nonzero(binary_out.scores.argmax(1) == binary.positive_index).flatten()
                if _same_preprocessing(binary.spec, classifier.spec):
                    crops = crops[classified.to(crops.device)]
                else:
                    crops = crops_for(classified, classifier.spec)
                lap("crop")
            terminal = self.classify(classifier, crops)
            lap("classify")
        return BatchOutput(image_index, flat, binary_out, classified, terminal, dropped, timings)


def _same_preprocessing(a: ClassifierSpec, b: ClassifierSpec) -> bool:
    return (a.input_size, a.mean, a.std) == (b.input_size, b.mean, b.std)


def _valid_boxes(boxes: list[torch.Tensor], sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flatten per-image boxes to (image_index, (n, 4) int64), clipped to the image; boxes with
    no pixels left are dropped (upstream skips them: they cannot be cropped or classified)."""
    indices, kept, dropped = [], [], 0
    for i, (image_boxes, (height, width)) in enumerate(zip(boxes, sizes)):
        b = torch.as_tensor(image_boxes, dtype=torch.float64).reshape(-1, 4).to(torch.int64)
        b[:, 0::2] = b[:, 0::2].clamp(0, int(width))
        b[:, 1::2] = b[:, 1::2].clamp(0, int(height))
        ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        dropped += int((~ok).sum())
        kept.append(b[ok])
        indices.append(torch.full((int(ok.sum()),), i, dtype=torch.int64))
    if not kept:
        return torch.empty(0, dtype=torch.int64), torch.empty((0, 4), dtype=torch.int64), dropped
    return torch.cat(indices), torch.cat(kept), dropped
