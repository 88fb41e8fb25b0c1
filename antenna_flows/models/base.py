"""The interface every model kind implements: the worker's only view of the GPU.

A model serves one or more pipelines. ``predict`` is blocking and runs on one of
the worker's inference threads (a "slot"); the event loop stays free for NATS
heartbeats, downloads and result posts while it runs. The feeding hooks
(``decode``, ``prepare``) run in loader threads, so pixel work stays off the slot.
:class:`ModelBase` gives every hook a sane default; a model overrides what it can
do better.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image, ImageDraw, ImageFilter

from antenna_flows.schemas import PipelineProcessingTask, PipelineResultsResponse

WARMUP_SIZE = (1024, 768)  # the detector resizes to 800-1333 px whatever the input


@dataclass(slots=True)
class ImageInput:
    """A decoded image and the task it came from.

    ``image`` is what the model's ``decode(data)`` made of the downloaded bytes,
    or, when that said None, ``prepare(pil_image)`` of the loader's PIL decode.
    """

    task: PipelineProcessingTask
    image: Image.Image | Any


class UnknownPipeline(LookupError):
    """The model kind does not know this pipeline slug."""


class Model(Protocol):
    kind: str

    def pipelines(self) -> list[str]:
        """Slugs this model can serve."""
        ...

    def load(self, pipeline: str) -> None:
        """Make ``pipeline`` ready (weights in memory); idempotent. Raises UnknownPipeline."""
        ...

    def predict(self, pipeline: str, images: list[ImageInput]) -> list[PipelineResultsResponse]:
        """One result per input image, in order. Blocking; called on an inference thread."""
        ...

    def expected_seconds_per_image(self, pipeline: str, batch_size: int) -> float | None:
        """A prior for the scheduler's cost model, or None: the worker times a warm-up image instead."""
        ...

    def decode(self, data: bytes) -> Any | None:
        """Downloaded bytes straight to what ``predict`` takes (loader thread), or None to leave it to PIL.

        Raises on corrupt data; the loader turns that into the image's error result.
        """
        ...

    def prepare(self, image: Image.Image) -> Any:
        """A PIL image (RGB) as what ``predict`` takes, in a loader thread."""
        ...

    def warmup_input(self) -> Any:
        """An input for the warm-up prediction that loads kernels and times one image."""
        ...

    def close(self) -> None: ...


class ModelBase:
    """Defaults for the optional hooks: no prior, PIL decoding, images passed through as is."""

    kind = "base"

    def expected_seconds_per_image(self, pipeline: str, batch_size: int) -> float | None:
        return None

    def decode(self, data: bytes) -> Any | None:
        return None

    def prepare(self, image: Image.Image) -> Any:
        return image

    def warmup_input(self) -> Any:
        return self.prepare(warmup_frame(*WARMUP_SIZE))

    def close(self) -> None:
        pass


def warmup_frame(width: int, height: int, seed: int = 0) -> Image.Image:
    """A trap-like frame (light sheet, a few dark winged blobs), so the classifiers get crops too."""
    rng = random.Random(seed)
    frame = Image.new("RGB", (width, height), (232, 228, 214))
    draw = ImageDraw.Draw(frame)
    scale = min(width, height)
    for _ in range(6):
        x, y = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        r = scale * rng.uniform(0.03, 0.07)
        shade = tuple(rng.randint(40, 110) for _ in range(3))
        draw.ellipse((x - 1.6 * r, y - r, x + 1.6 * r, y + r), fill=shade)
        draw.ellipse((x - 0.3 * r, y - 1.3 * r, x + 0.3 * r, y + 1.3 * r), fill=(30, 26, 22))
    return frame.filter(ImageFilter.GaussianBlur(radius=1.5))
