"""A timed stand-in for the GPU, so scheduling is measured apart from compute.

It holds the inference slot for ``seconds_per_batch + n * seconds_per_image``
(calibrated from a real GPU) and returns schema-valid results with one
detection per image, so the API, accounting and benchmarks see real traffic.

It serves pipelines of its own, ``sim-<slug>`` (``registry.sim_pipeline_slugs``), and
refuses every real pipeline: its answers name the sim algorithms, which a real pipeline
has not registered (Antenna would refuse every save and the tasks would be redelivered
until dead-lettered). ``registration`` declares these pipelines and algorithms, with
the category map Antenna requires of the sim classifier (:data:`SIM_LABEL`).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

from PIL import Image

from antenna_flows.models.base import WARMUP_SIZE, ImageInput, ModelBase, UnknownPipeline
from antenna_flows.models.registry import is_sim_slug, sim_pipeline_slugs
from antenna_flows.schemas import (
    AlgorithmReference,
    BoundingBox,
    ClassificationResponse,
    DetectionResponse,
    PipelineResultsResponse,
    SourceImageResponse,
    utcnow,
)

@dataclass(frozen=True)
class SimFrame:
    """What the sim model needs of an image: its size."""

    size: tuple[int, int]


SIM_DETECTOR = AlgorithmReference(name="Simulated detector", key="sim-detector")
SIM_CLASSIFIER = AlgorithmReference(name="Simulated classifier", key="sim-classifier")
SIM_LABEL = "Simulated moth"  # the sim classifier's one class: its category map is [SIM_LABEL]
SIM_TAXON_RANK = "SPECIES"


class SimModel(ModelBase):
    kind = "sim"

    def __init__(self, seconds_per_image: float = 0.05, seconds_per_batch: float = 0.02):
        self.seconds_per_image = seconds_per_image
        self.seconds_per_batch = seconds_per_batch

    def pipelines(self) -> list[str]:
        return sim_pipeline_slugs()

    def load(self, pipeline: str) -> None:
        if not is_sim_slug(pipeline):
            hint = f" (did you mean sim-{pipeline}?)" if is_sim_slug(f"sim-{pipeline}") else ""
            raise UnknownPipeline(
                f"{pipeline}: the sim model serves only its own pipelines, sim-<slug>{hint}; never a real pipeline, "
                "whose saves would refuse the sim algorithms"
            )

    def decode(self, data: bytes) -> "SimFrame | None":
        """Check a JPEG decodes, at 1/8 scale (DCT scaling: ~10x cheaper than a full decode).

        The sim needs no pixels, only the frame size and the certainty that a real
        decoder would accept the file; the CPU this saves stays with the scheduling
        under test. A file this rejects goes through the full PIL decode for its error.
        """
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return None
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
        return SimFrame(size)

    def warmup_input(self) -> SimFrame:
        return SimFrame(WARMUP_SIZE)

    def expected_seconds_per_image(self, pipeline: str, batch_size: int) -> float:
        """The sim is calibrated, so the scheduler can start from the truth."""
        return self.seconds_per_image + self.seconds_per_batch / max(1, batch_size)

    def predict(self, pipeline: str, images: list[ImageInput]) -> list[PipelineResultsResponse]:
        self.load(pipeline)
        start = time.perf_counter()
        time.sleep(self.seconds_per_batch + len(images) * self.seconds_per_image)
        elapsed = time.perf_counter() - start
        per_image = elapsed / max(1, len(images))
        now = utcnow()
        results = []
        for item in images:
            w, h = item.image.size
            bbox = BoundingBox(x1=w * 0.25, y1=h * 0.25, x2=w * 0.5, y2=h * 0.5)
            detection = DetectionResponse(
                source_image_id=item.task.image_id,
                bbox=bbox,
                inference_time=per_image,
                algorithm=SIM_DETECTOR,
                timestamp=now,
                classifications=[
                    ClassificationResponse(
                        classification=SIM_LABEL,
                        labels=None,
                        scores=[0.9],
                        logits=[2.2],
                        inference_time=per_image,
                        algorithm=SIM_CLASSIFIER,
                        terminal=True,
                        timestamp=now,
                    )
                ],
            )
            results.append(
                PipelineResultsResponse(
                    pipeline=pipeline,
                    algorithms={},
                    total_time=per_image,
                    source_images=[SourceImageResponse(id=item.task.image_id, url=item.task.image_url)],
                    detections=[detection],
                )
            )
        return results

    def close(self) -> None:
        pass
