"""The real AMI pipeline behind the worker's Model interface (kind ``ami``).

Serves every pipeline of the registry. Pipelines are loaded on demand and kept in a small LRU
of terminal classifiers; the detector and the moth filter are shared by all pipelines and stay
loaded. Results are upstream's, field for field: one ``PipelineResultsResponse`` per image;
each detection carries the moth filter's classification (terminal=false in species
pipelines), and moths also the terminal classifier's; every classification holds the full
softmax ``scores`` and ``logits`` in class-index order with ``labels`` omitted (Antenna takes
them from the registered category map). ``scores``/``logits`` are float32 numpy rows, not
lists: serialise results with :func:`antenna_flows.results_codec.dumps` (pydantic's own
``model_dump_json`` also works, at the cost of a Python float per value).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from antenna_flows.models.base import ImageInput, ModelBase, UnknownPipeline
from antenna_flows.models.engine import BatchOutput, Engine, LoadedClassifier, LoadedDetector, StageOutput
from antenna_flows.models.registry import PIPELINES, ClassifierSpec, PipelineSpec
from antenna_flows.schemas import (
    AlgorithmReference,
    BoundingBox,
    ClassificationResponse,
    DetectionResponse,
    PipelineResultsResponse,
    SourceImageResponse,
    utcnow,
)
from antenna_flows.settings import WorkerSettings

log = logging.getLogger(__name__)


class AmiModel(ModelBase):
    """Detector -> moth filter -> classifier on one device, for any pipeline of ``pipelines``
    (default: the registry; tests pass smaller variants).

    After each ``predict``: ``last_timings`` holds seconds per stage (prepare, detect, crop,
    binary, classify, results, total) and ``last_counts`` the images, detections, classified
    (by the terminal classifier) and dropped (empty boxes) counts.
    """

    kind = "ami"

    def __init__(self, weights_dir: Path, *, device: str = "auto", precision: str = "auto",
                 allow_download: bool = False, max_loaded_pipelines: int = 3,
                 pipelines: Mapping[str, PipelineSpec] | None = None):
        self.engine = Engine(weights_dir, device=device, precision=precision, allow_download=allow_download)
        self.specs: dict[str, PipelineSpec] = dict(PIPELINES if pipelines is None else pipelines)
        self.max_loaded_pipelines = max_loaded_pipelines
        self._detectors: dict[str, LoadedDetector] = {}
        self._classifiers: OrderedDict[str, LoadedClassifier] = OrderedDict()  # by weights file, LRU order
        self._lock = threading.Lock()
        self.last_timings: dict[str, float] = {}
        self.last_counts: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> AmiModel:
        return cls(
            settings.weights_dir,
            device=settings.device,
            precision=settings.inference_precision,
            allow_download=settings.allow_weight_download,
            max_loaded_pipelines=settings.max_loaded_pipelines,
        )

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def pipelines(self) -> list[str]:
        return list(self.specs)

    def prepare(self, image: Any) -> torch.Tensor:
        """``image`` as the (3, H, W) uint8 tensor ``predict`` starts from (pinned on a GPU).

        Thread-safe and independent of the slot: call it where images are decoded and put the
        tensor in ``ImageInput.image`` (``predict`` takes such tensors as well as PIL images).
        On 4K frames this moves ~50 ms per image of CPU work off the GPU's critical path.
        """
        return self.engine.host_tensor(image)

    def decode(self, data: bytes) -> torch.Tensor | None:
        """JPEG bytes as the tensor :meth:`prepare` makes (``predict`` takes it unchanged),
        decoded by torchvision in the loader thread at a third of PIL's cost; None for other
        formats, which the loader decodes with PIL and passes through ``prepare``.
        Raises on corrupt data (the loader turns that into the image's error result).

        Decoding stays on the CPU. Measured on an H200 with 16 cores, 4K frames, bf16 batches of
        16 (``lab/antenna_lab/bench/gpu_bench.py --feed``): 8 loader threads decoding this way feed 68
        img/s, as much as tensors decoded beforehand (65) or nvjpeg batch-decoding on the slot
        (65), while PIL + prepare feeds 32 (its threads also slow the slot down). nvjpeg
        would buy nothing yet and would put decoding on the slot and let one corrupt file fail
        a whole batch.
        """
        return self.engine.decode(data)

    # --- loading -------------------------------------------------------------------

    def _spec(self, pipeline: str) -> PipelineSpec:
        try:
            return self.specs[pipeline]
        except KeyError:
            raise UnknownPipeline(pipeline) from None

    def load(self, pipeline: str) -> None:
        with self._lock:
            self._models(self._spec(pipeline))

    def _models(self, spec: PipelineSpec) -> tuple[LoadedDetector, LoadedClassifier | None, LoadedClassifier]:
        detector = self._detectors.get(spec.detector.weights.filename)
        if detector is None:
            detector = self._detectors[spec.detector.weights.filename] = self.engine.load_detector(spec.detector)
        binary = self._classifier(spec.binary) if spec.binary else None
        return detector, binary, self._classifier(spec.classifier)

    def _classifier(self, spec: ClassifierSpec) -> LoadedClassifier:
        """Loaded classifier for ``spec``, most recently used last; evicts beyond the LRU size
        (moth filters, shared by all species pipelines, are never evicted)."""
        key = spec.weights.filename
        if key in self._classifiers:
            self._classifiers.move_to_end(key)
            return self._classifiers[key]
        loaded = self._classifiers[key] = self.engine.load_classifier(spec)
        filters = {s.binary.weights.filename for s in self.specs.values() if s.binary}
        evictable = [k for k in self._classifiers if k not in filters]
        for old in evictable[: max(0, len(evictable) - self.max_loaded_pipelines)]:
            log.info("unloading classifier %s", old)
            del self._classifiers[old]
            self._release_cache()
        return loaded

    def _release_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- inference -----------------------------------------------------------------

    def predict(self, pipeline: str, images: list[ImageInput]) -> list[PipelineResultsResponse]:
        return self._predict(pipeline, images, boxes=None)

    def predict_boxes(self, pipeline: str, images: list[ImageInput],
                      boxes: Sequence[Sequence[Sequence[float]]]) -> list[PipelineResultsResponse]:
        """Classify given boxes (x1, y1, x2, y2 pixels, per image) instead of detecting them."""
        return self._predict(pipeline, images, boxes=[torch.as_tensor(b, dtype=torch.float64) for b in boxes])

    def _predict(self, pipeline: str, images: list[ImageInput], boxes: list[torch.Tensor] | None) -> list[PipelineResultsResponse]:
        if not images:
            return []
        start = time.perf_counter()
        with self._lock:
            spec = self._spec(pipeline)
            detector, binary, classifier = self._models(spec)
            try:
                output = self.engine.run([item.image for item in images], classifier, detector=detector,
                                         binary=binary, boxes=boxes)
            except torch.cuda.OutOfMemoryError:
                self._release_cache()  # let the worker's image-by-image retry start from a clean cache
                raise
        results_start = time.perf_counter()
        results = _results(spec, images, output, binary, classifier, detector, time.perf_counter() - start)
        self.last_timings = {**output.timings, "results": time.perf_counter() - results_start,
                             "total": time.perf_counter() - start}
        self.last_counts = {"images": len(images), "detections": len(output.boxes),
                            "classified": len(output.classified), "dropped": output.dropped}
        return results

    def close(self) -> None:
        with self._lock:
            self._detectors.clear()
            self._classifiers.clear()
            self._release_cache()


def _reference(spec: Any) -> AlgorithmReference:
    return AlgorithmReference(name=spec.name, key=spec.key)


def _classifications(stage: StageOutput, labels: list[str], algorithm: AlgorithmReference, terminal: bool,
                     seconds_per_crop: float) -> list[ClassificationResponse]:
    """One response per crop, holding its row of the stage's float32 arrays (a view: no copy, no
    Python float per class). Built without re-validation: 29k scores per crop for the global
    model; :mod:`antenna_flows.results_codec` writes them as JSON straight from the arrays."""
    now = utcnow()
    scores, logits = stage.scores.numpy(), stage.logits.numpy()
    best = scores.argmax(1).tolist() if len(scores) else []
    return [
        ClassificationResponse.model_construct(
            classification=labels[b], labels=None, scores=scores[i], logits=logits[i],
            inference_time=seconds_per_crop, algorithm=algorithm, terminal=terminal, timestamp=now,
        )
        for i, b in enumerate(best)
    ]


def _results(spec: PipelineSpec, images: list[ImageInput], output: BatchOutput, binary: LoadedClassifier | None,
             classifier: LoadedClassifier, detector: LoadedDetector, elapsed: float) -> list[PipelineResultsResponse]:
    timings = output.timings
    per_row: list[list[ClassificationResponse]] = [[] for _ in range(len(output.boxes))]
    if binary is not None and output.binary is not None:
        seconds = timings["binary"] / max(1, len(output.boxes))
        for row, c in enumerate(_classifications(output.binary, binary.labels, _reference(binary.spec), False, seconds)):
            per_row[row].append(c)
    seconds = timings["classify"] / max(1, len(output.classified))
    terminal = _classifications(output.terminal, classifier.labels, _reference(classifier.spec), True, seconds)
    for row, c in zip(output.classified.tolist(), terminal):
        per_row[row].append(c)

    detector_ref = _reference(detector.spec)
    detect_seconds = timings["detect"] / len(images)
    now = utcnow()
    detections: list[list[DetectionResponse]] = [[] for _ in images]
    for row, (image, box) in enumerate(zip(output.image_index.tolist(), output.boxes.tolist())):
        x1, y1, x2, y2 = (float(v) for v in box)
        detections[image].append(DetectionResponse.model_construct(
            source_image_id=images[image].task.image_id, bbox=BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2),
            inference_time=detect_seconds, algorithm=detector_ref, timestamp=now, crop_image_url=None,
            classifications=per_row[row],
        ))
    per_image = elapsed / len(images)
    return [
        PipelineResultsResponse(
            pipeline=spec.slug, algorithms={}, total_time=per_image,
            source_images=[SourceImageResponse(id=item.task.image_id, url=item.task.image_url)],
            detections=dets, errors=None,
        )
        for item, dets in zip(images, detections)
    ]
