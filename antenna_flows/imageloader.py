"""Download and decode task images off the event loop, with hard limits.

A bad image is a property of one task, never of a batch: every failure here
becomes an :class:`ImageError` with a message fit for an error result
(missing, not an image, truncated, too large), and the worker sends that task
an error result instead of inference.
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import httpx
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)


class ImageError(Exception):
    """This image can never be processed; the message goes into the error result."""


class ImageLoader:
    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        timeout_s: float = 30.0,
        max_bytes: int = 64 * 1024 * 1024,
        max_pixels: int = 80_000_000,
        concurrency: int = 16,
    ):
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), follow_redirects=True, limits=httpx.Limits(max_connections=concurrency)
        )
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._sem = asyncio.Semaphore(concurrency)

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    async def fetch(self, url: str) -> bytes:
        if not url.startswith(("http://", "https://")):
            raise ImageError(f"unsupported image URL {url!r}")
        async with self._sem:
            try:
                async with self.client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise ImageError(f"image download failed: HTTP {response.status_code} for {url}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > self.max_bytes:
                        raise ImageError(f"image too large: {declared} bytes > {self.max_bytes} ({url})")
                    chunks = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise ImageError(f"image too large: over {self.max_bytes} bytes ({url})")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.HTTPError as exc:
                raise ImageError(f"image download failed: {type(exc).__name__}: {exc} ({url})") from exc

    def _open(self, data: bytes, url: str) -> Image.Image:
        """The lazily opened image: PIL reads only the header here, so the limits are enforced
        (and garbage rejected) before anything is decoded, whichever decoder runs next."""
        if not data:
            raise ImageError(f"empty image file ({url})")
        with _as_image_errors(url), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > self.max_pixels:
            raise ImageError(f"image too large: {w}x{h} pixels > {self.max_pixels} ({url})")
        return image

    def decode(self, data: bytes, url: str = "") -> Image.Image:
        """Decode fully with PIL (a truncated file fails here, not on the GPU thread) to RGB."""
        image = self._open(data, url)
        with _as_image_errors(url):
            image.load()
            return image.convert("RGB") if image.mode != "RGB" else image

    def decode_with(self, data: bytes, url: str, decode: Callable[[bytes], Any] | None,
                    prepare: Callable[[Image.Image], Any] | None) -> Any:
        """Limits first, then the model's own ``decode`` (e.g. JPEG bytes straight to a pinned
        tensor, a third of PIL's CPU cost on 4K frames), else PIL + ``prepare``.

        ``decode`` returns None for formats it does not handle. When it raises, the image goes
        through PIL instead: an image PIL can read is never rejected by the fast path, and a
        really corrupt one still ends as an :class:`ImageError` (with PIL's message).
        """
        if decode is not None:
            self._open(data, url)
            try:
                decoded = decode(data)
            except Exception as exc:  # noqa: BLE001 - decoder errors vary (RuntimeError from torchvision)
                log.debug("fast decode failed for %s (%s); trying PIL", url, str(exc).rsplit(", ", 1)[-1])
                decoded = None
            if decoded is not None:
                return decoded
        image = self.decode(data, url)
        try:
            return prepare(image) if prepare else image
        except Exception as exc:  # noqa: BLE001 - one image's failure must not fail its batch
            raise ImageError(f"image preparation failed: {type(exc).__name__}: {exc} ({url})") from exc

    async def load(self, url: str, prepare: Callable[[Image.Image], Any] | None = None,
                   decode: Callable[[bytes], Any] | None = None) -> Any:
        """Download, decode and (optionally) ``prepare`` the image, the CPU parts on a thread.

        ``prepare`` is the model's own conversion (e.g. to a pinned uint8 tensor), so it
        happens here, overlapping inference, instead of on the GPU's critical path; ``decode``
        (bytes -> the same prepared value, or None) is the model's faster decoder, tried first
        (see :meth:`decode_with`).
        """
        data = await self.fetch(url)
        return await asyncio.to_thread(self.decode_with, data, url, decode, prepare)


@contextmanager
def _as_image_errors(url: str) -> Iterator[None]:
    """PIL's ways of failing on bad data, as :class:`ImageError` with a message fit for a result."""
    try:
        yield
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"not a readable image: {exc} ({url})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc} ({url})") from exc
