"""Download and decode task images off the event loop, with hard limits.

A bad image is a property of one task, never of a batch: every failure here
becomes an :class:`ImageError` with a message fit for an error result
(what failed, which URL, why), and the worker sends that task an error result
instead of inference.

Image URLs come from task bodies, so they are untrusted input. The loader:

- fetches only ``http``/``https`` URLs (``file:``, ``ftp:``, ``data:``, no scheme... are refused
  before any connection), optionally only from an allow-list of hosts (``image_hosts``);
- follows at most ``max_redirects`` redirects itself, checking every hop's URL the same way
  (a redirect to ``file:`` or to a host off the list is refused);
- stops reading a body once it passes ``max_bytes``, whatever Content-Length says (absent,
  lying, or gzip-encoded: the cap counts what would be decoded);
- gives each download ``timeout_s`` in total (a server dripping a byte a second fails at the
  deadline, not after ``timeout_s`` per read);
- reads the dimensions from the header (PIL, only known raster formats) and refuses images over
  ``max_pixels`` before anything decodes them, the model's fast JPEG decoder included.
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Callable

import httpx
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

SCHEMES = ("http", "https")
MAX_URL_CHARS = 8192
# Raster formats a camera trap or Antenna may serve. PIL can open many more (EPS runs
# Ghostscript, others are rarely exercised parsers): an image in any other format is refused.
FORMATS = ("JPEG", "PNG", "TIFF", "WEBP", "BMP", "GIF")  # JPEG includes MPO (multi-picture JPEG)


class ImageError(Exception):
    """This image can never be processed; the message goes into the error result."""


def short(url: str, limit: int = 200) -> str:
    """``url`` for a message: a hostile 1 MB URL must not become a 1 MB error result or log line,
    nor control characters (CR/LF, NUL...) one that forges log lines."""
    url = str(url)
    cut = url if len(url) <= limit else f"{url[:limit]}... ({len(url)} chars)"
    return cut if cut.isprintable() else "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in cut)


def _host_allowed(host: str, hosts: tuple[str, ...]) -> bool:
    """``hosts`` entries: ``name`` (exactly that host) or ``*.name`` / ``.name`` (any subdomain of it)."""
    host = host.lower().rstrip(".")
    for entry in hosts:
        if entry.startswith(("*.", ".")):
            suffix = entry.lstrip("*")
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == entry:
            return True
    return False


class ImageLoader:
    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        timeout_s: float = 30.0,
        max_bytes: int = 64 * 1024 * 1024,
        max_pixels: int = 80_000_000,
        concurrency: int = 16,
        hosts: Iterable[str] = (),
        max_redirects: int = 3,
    ):
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), follow_redirects=False, limits=httpx.Limits(max_connections=concurrency)
        )
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_redirects = max_redirects
        self.hosts = tuple(h.strip().lower().rstrip(".") for h in hosts if h.strip())
        self._sem = asyncio.Semaphore(concurrency)

    @classmethod
    def from_settings(cls, settings: Any, client: httpx.AsyncClient | None = None) -> ImageLoader:
        """A loader with a :class:`~antenna_flows.settings.WorkerSettings`' ``image_*`` limits."""
        return cls(
            client,
            timeout_s=settings.image_timeout_s,
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
            concurrency=settings.download_concurrency,
            hosts=settings.image_hosts,
            max_redirects=settings.image_max_redirects,
        )

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    def check_url(self, url: str, *, what: str = "image URL") -> httpx.URL:
        """``url`` parsed, or an :class:`ImageError` saying why it may not be fetched."""
        if not isinstance(url, str) or not url:
            raise ImageError(f"refused {what}: empty")
        if len(url) > MAX_URL_CHARS:
            raise ImageError(f"refused {what}: {len(url)} characters, more than {MAX_URL_CHARS} ({short(url)})")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise ImageError(f"refused {what}: not a valid URL ({short(str(exc))}): {short(url)}") from exc
        scheme = parsed.scheme.lower()
        if scheme not in SCHEMES:
            why = f"scheme {scheme!r} is not http or https" if scheme else "no scheme (http:// or https:// expected)"
            raise ImageError(f"refused {what}: {why}: {short(url)}")
        if not parsed.host:
            raise ImageError(f"refused {what}: no host: {short(url)}")
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise ImageError(f"refused {what}: port {parsed.port} out of range: {short(url)}")
        if self.hosts and not _host_allowed(parsed.host, self.hosts):
            raise ImageError(
                f"refused {what}: host {short(parsed.host, 100)!r} is not in the allowed image hosts "
                f"(AMI_IMAGE_HOSTS={','.join(self.hosts)}): {short(url)}"
            )
        return parsed

    async def fetch(self, url: str) -> bytes:
        """The body of ``url`` (after at most ``max_redirects`` checked redirects), within
        ``max_bytes`` and ``timeout_s`` in total (from when a download slot is free)."""
        self.check_url(url)
        async with self._sem:
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await self._fetch(url)
            except TimeoutError:
                raise ImageError(
                    f"image download took longer than {self.timeout_s:g} s in total (slow or stalled server): {short(url)}"
                ) from None
            except httpx.HTTPError as exc:
                raise ImageError(f"image download failed: {type(exc).__name__}: {short(str(exc))} ({short(url)})") from exc
            except httpx.InvalidURL as exc:  # httpx builds the next request of a redirect even when not following it
                raise ImageError(f"refused redirect: unusable Location ({short(str(exc))}) from {short(url)}") from exc
            except ImageError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever else breaks is still this image's failure, not the worker's
                log.warning("unexpected error downloading %s", short(url), exc_info=True)
                raise ImageError(f"image download failed: {type(exc).__name__}: {short(str(exc))} ({short(url)})") from exc

    async def _fetch(self, url: str) -> bytes:
        current = url
        for hop in range(self.max_redirects + 1):
            async with self.client.stream(
                "GET", current, follow_redirects=False, headers={"Accept-Encoding": "identity"}
            ) as response:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    if hop == self.max_redirects:
                        raise ImageError(
                            f"image download failed: more than {self.max_redirects} redirects "
                            f"(last to {short(location)}) for {short(url)}"
                        )
                    try:
                        target = str(response.url.join(location))
                    except (httpx.InvalidURL, ValueError) as exc:
                        raise ImageError(f"refused redirect: bad Location {short(location)!r} from {short(current)}") from exc
                    self.check_url(target, what=f"redirect from {short(current, 100)} to")
                    current = target
                    continue
                if response.status_code != 200:
                    via = "" if current == url else f" (redirected to {short(current)})"
                    raise ImageError(f"image download failed: HTTP {response.status_code} for {short(url)}{via}")
                return await self._read(response, url)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read(self, response: httpx.Response, url: str) -> bytes:
        try:
            declared = int(response.headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            raise ImageError(f"image too large: Content-Length {declared} bytes > {self.max_bytes} ({short(url)})")
        chunks = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise ImageError(f"image too large: more than {self.max_bytes} bytes, download cut off ({short(url)})")
            chunks.append(chunk)
        return b"".join(chunks)

    def _open(self, data: bytes, url: str) -> Image.Image:
        """The lazily opened image: PIL reads only the header here, so the limits are enforced
        (and garbage rejected) before anything is decoded, whichever decoder runs next."""
        if not data:
            raise ImageError(f"empty image file ({short(url)})")
        with _as_image_errors(url):
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = image.size
        if w * h > self.max_pixels:
            raise ImageError(f"image too large: {w}x{h} pixels > {self.max_pixels}, refused before decoding ({short(url)})")
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
                log.debug("fast decode failed for %s (%s); trying PIL", short(url), str(exc).rsplit(", ", 1)[-1])
                decoded = None
            if decoded is not None:
                return decoded
        image = self.decode(data, url)
        try:
            return prepare(image) if prepare else image
        except Exception as exc:  # noqa: BLE001 - one image's failure must not fail its batch
            raise ImageError(f"image preparation failed: {type(exc).__name__}: {short(str(exc))} ({short(url)})") from exc

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
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression bomb): {exc} ({short(url)})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"not a readable image (not one of {', '.join(FORMATS)}) ({short(url)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {short(str(exc))} ({short(url)})") from exc


# PIL warns (once, globally) about images over Image.MAX_IMAGE_PIXELS. The loader refuses them
# itself (max_pixels, from the header), so the warning adds nothing; turning it into an error with
# warnings.catch_warnings() per call is not thread-safe, and loader threads decode concurrently.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
