"""The interface every model kind implements: the worker's only view of the GPU.

A model serves one or more pipelines. ``predict`` is blocking and runs on the
worker's single inference thread (the "slot"); the event loop stays free for
NATS heartbeats, downloads and result posts while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from antenna_flows.schemas import PipelineProcessingTask, PipelineResultsResponse


@dataclass(slots=True)
class ImageInput:
    """A decoded image and the task it came from.

    ``image`` is an RGB PIL image, or whatever the model's optional
    ``host_tensor(image)`` made of it in the loader thread (the worker calls it
    there when the model has one, to keep pixel conversion off the slot), or
    what its optional ``decode(data)`` made of the downloaded bytes (tried
    first; it returns None for formats it leaves to PIL + ``host_tensor``).
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
        """One result per input image, in order. Blocking; called on the inference thread."""
        ...

    def close(self) -> None: ...
