"""Synthetic frames: deterministic, the requested size, a small pool, and broken URLs where asked."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from antenna_lab.antenna.demo_images import DemoImages, demo_image_urls, generate_frame, pool_index


def test_frames_are_light_with_dark_shapes_and_deterministic() -> None:
    frame = generate_frame(320, 240, seed=3)
    assert frame.size == (320, 240) and frame.mode == "RGB"
    grey = frame.convert("L")
    lo, hi = grey.getextrema()
    assert hi > 190 and lo < 110  # a light sheet with dark moths on it
    assert sum(grey.histogram()[:120]) < 0.2 * 320 * 240  # mostly background
    assert generate_frame(320, 240, seed=3).tobytes() == frame.tobytes()
    assert generate_frame(320, 240, seed=4).tobytes() != frame.tobytes()


def test_names_share_a_small_pool_of_cached_frames() -> None:
    images = DemoImages(pool_size=4)
    assert {pool_index(f"frame-{i}", 4) for i in range(100)} == {0, 1, 2, 3}
    data = images.jpeg(64, 48, "frame-1")
    assert Image.open(io.BytesIO(data)).size == (64, 48)
    assert images.jpeg(64, 48, "frame-1") is data  # from the cache
    with pytest.raises(ValueError):
        images.jpeg(8, 48, "frame-1")


def test_corrupt_frames_fail_to_decode() -> None:
    broken = DemoImages().corrupt_jpeg("x")
    image = Image.open(io.BytesIO(broken))  # the header still reads...
    with pytest.raises(OSError):
        image.load()  # ...the pixels do not


def test_url_lists_spread_the_broken_ones() -> None:
    urls = demo_image_urls("http://h:1/", 10, 320, 240, missing=2, corrupt=1, prefix="job7")
    assert len(urls) == 10 and len(set(urls)) == 10
    assert urls[0] == "http://h:1/images/demo/320x240/job7-000000.jpg"
    assert sum("/missing/" in u for u in urls) == 2 and sum("/corrupt/" in u for u in urls) == 1
    assert [i for i, u in enumerate(urls) if "/demo/" not in u] == [1, 5, 8]
    assert demo_image_urls("http://h:1", 3, missing=3)[2].startswith("http://h:1/images/missing/")
    with pytest.raises(ValueError):
        demo_image_urls("http://h:1", 2, missing=2, corrupt=1)
