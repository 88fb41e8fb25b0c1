"""Synthetic camera-trap frames: a light, textured sheet with dark moth-like shapes.

The local API serves these so a demo, a test or a benchmark needs no real
images and no network. Frames are deterministic per (size, name), and names
map onto a small pool of distinct frames per size, so a 10,000-image job costs
a handful of JPEG encodes. Broken inputs (missing, corrupt) are URLs too, so a
bad-input run exercises the worker's real download and decode path.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import threading
from collections import OrderedDict

from PIL import Image, ImageDraw, ImageFilter

POOL_SIZE = 16
MIN_SIDE = 16
MAX_SIDE = 8192
CACHE_FRAMES = 64
JPEG_QUALITY = 85


def pool_index(name: str, pool_size: int = POOL_SIZE) -> int:
    """Which frame of the pool a name shows (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big") % pool_size


def valid_size(width: int, height: int) -> bool:
    return MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE


def generate_frame(width: int, height: int, seed: int, moths: int | None = None) -> Image.Image:
    """One RGB frame: off-white sheet with soft blotches, then ``moths`` dark winged shapes."""
    rng = random.Random(f"{width}x{height}:{seed}")
    # Texture: coarse random greys, upsampled smoothly, mixed over a warm light base.
    coarse = (max(2, width // 24), max(2, height // 24))
    noise = Image.frombytes("L", coarse, rng.randbytes(coarse[0] * coarse[1])).resize((width, height), Image.BICUBIC)
    base = Image.new("RGB", (width, height), (rng.randint(225, 240), rng.randint(222, 236), rng.randint(205, 222)))
    frame = Image.composite(Image.new("RGB", (width, height), (180, 176, 165)), base, noise.point(lambda v: v // 4))
    scale = min(width, height)
    count = moths if moths is not None else rng.randint(3, 9)
    for _ in range(count):
        _draw_moth(frame, rng, scale)
    return frame.filter(ImageFilter.GaussianBlur(radius=max(0.5, scale / 900)))


def _draw_moth(frame: Image.Image, rng: random.Random, scale: int) -> None:
    """A body ellipse with two pairs of wings, rotated, pasted at a random spot."""
    length = max(6, int(scale * rng.uniform(0.05, 0.12)))
    size = length * 2
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    c = size / 2
    span = length * rng.uniform(0.25, 0.35)  # half-width of a forewing
    for side in (-1, 1):
        fore, hind = c + side * span, c + side * span * 0.75
        draw.ellipse((fore - span, c - length * 0.35, fore + span, c + length * 0.05), fill=235)
        draw.ellipse((hind - span * 0.75, c - length * 0.05, hind + span * 0.75, c + length * 0.3), fill=215)
    draw.ellipse((c - length * 0.08, c - length * 0.4, c + length * 0.08, c + length * 0.4), fill=255)
    layer = layer.rotate(rng.uniform(0, 360), resample=Image.BICUBIC)
    shade = rng.randint(35, 90)
    colour = (shade + rng.randint(0, 30), shade + rng.randint(0, 20), shade)
    x = rng.randint(0, max(0, frame.width - size))
    y = rng.randint(0, max(0, frame.height - size))
    frame.paste(Image.new("RGB", layer.size, colour), (x, y), layer)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def corrupt_jpeg(data: bytes) -> bytes:
    """A JPEG cut short, with the scan data that remains garbled: its header reads, its pixels never decode."""
    cut = bytearray(data[: max(64, len(data) * 2 // 5)])
    for i in range(len(cut) // 2, len(cut), 97):
        cut[i] ^= 0x5A
    return bytes(cut)


class DemoImages:
    """A thread-safe cache of encoded frames (LRU over (width, height, pool index))."""

    def __init__(self, pool_size: int = POOL_SIZE, cache_frames: int = CACHE_FRAMES):
        self.pool_size = pool_size
        self.cache_frames = cache_frames
        self._cache: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple[int, int, int], threading.Lock] = {}

    def jpeg(self, width: int, height: int, name: str) -> bytes:
        if not valid_size(width, height):
            raise ValueError(f"frame size {width}x{height} outside {MIN_SIDE}..{MAX_SIDE}")
        key = (width, height, pool_index(name, self.pool_size))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            build_lock = self._building.setdefault(key, threading.Lock())
        with build_lock:  # one encode per frame even when a fleet asks for it at once
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            data = encode_jpeg(generate_frame(width, height, key[2]))
            with self._lock:
                self._cache[key] = data
                self._building.pop(key, None)
                while len(self._cache) > self.cache_frames:
                    self._cache.popitem(last=False)
        return data

    def corrupt_jpeg(self, name: str, width: int = 320, height: int = 240) -> bytes:
        return corrupt_jpeg(self.jpeg(width, height, name))


def demo_image_urls(
    base_url: str,
    n: int,
    width: int = 640,
    height: int = 480,
    missing: int = 0,
    corrupt: int = 0,
    prefix: str = "frame",
) -> list[str]:
    """``n`` image URLs on the local API; ``missing`` and ``corrupt`` of them broken, spread evenly.

    ``base_url`` is the server root (``http://host:port``), not the ``/api/v2`` URL.
    """
    if missing < 0 or corrupt < 0 or missing + corrupt > n:
        raise ValueError(f"cannot break {missing} + {corrupt} of {n} images")
    root = base_url.rstrip("/")
    broken = _spread(n, missing + corrupt)
    kinds = {pos: ("missing" if k < missing else "corrupt") for k, pos in enumerate(broken)}
    urls = []
    for i in range(n):
        name = f"{prefix}-{i:06d}"
        kind = kinds.get(i)
        if kind is None:
            urls.append(f"{root}/images/demo/{width}x{height}/{name}.jpg")
        else:
            urls.append(f"{root}/images/{kind}/{name}.jpg")
    return urls


def _spread(n: int, k: int) -> list[int]:
    """``k`` distinct positions in ``range(n)``, evenly spaced (the first broken image is not image 0)."""
    if k == 0:
        return []
    step = n / k
    return [min(n - 1, int(math.floor(step * (j + 0.5)))) for j in range(k)]
