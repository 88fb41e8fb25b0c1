"""ImageLoader against a real local HTTP server: the model's fast decoder (JPEG bytes straight
to a tensor), the PIL fallback, and every way an image can fail becoming one ImageError."""

from __future__ import annotations

import io
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from antenna_flows.imageloader import ImageError, ImageLoader
from antenna_flows.models.ami import AmiModel
from tests.helpers import Spy, serve_http

W, H = 96, 64


def _pixels() -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    smooth = np.stack([x * 2, y * 3, (x + y)], axis=2).astype(np.uint8)  # JPEG-friendly gradients
    return np.clip(smooth.astype(int) + rng.integers(-8, 8, smooth.shape), 0, 255).astype(np.uint8)


def _encode(fmt: str, array: np.ndarray | None = None, **kw: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels() if array is None else array).save(buffer, fmt, **kw)
    return buffer.getvalue()


JPEG = _encode("JPEG", quality=95)
FILES = {
    "/good.jpg": JPEG,
    "/good.png": _encode("PNG"),
    "/gray.jpg": _encode("JPEG", _pixels()[:, :, 0]),
    "/truncated.jpg": JPEG[: len(JPEG) // 2],
    "/garbage.jpg": b"this is not an image at all" * 40,
    "/big.jpg": _encode("JPEG", np.zeros((400, 500, 3), np.uint8)),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = FILES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from serve_http(_Handler)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> AmiModel:
    return AmiModel(Path(tmp_path_factory.mktemp("weights")), device="cpu")  # decode needs no weights


async def _load(url: str, model: AmiModel, **limits: int):
    loader = ImageLoader(**limits)
    decode, prepare = Spy(model.decode), Spy(model.prepare)
    try:
        return await loader.load(url, prepare, decode), decode.calls, prepare.calls
    finally:
        await loader.aclose()


def _pil_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


async def test_jpeg_takes_the_fast_path_and_matches_pil(server, model):
    tensor, decodes, prepares = await _load(f"{server}/good.jpg", model)
    assert (decodes, prepares) == (1, 0)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, H, W)
    assert (tensor.int() - _pil_tensor(JPEG).int()).abs().max() <= 2
    assert model.prepare(tensor) is tensor  # already what predict starts from: passed through as is


async def test_grayscale_jpeg_becomes_rgb(server, model):
    tensor, decodes, _ = await _load(f"{server}/gray.jpg", model)
    assert decodes == 1 and tuple(tensor.shape) == (3, H, W)
    assert (tensor.int() - _pil_tensor(FILES["/gray.jpg"]).int()).abs().max() <= 2


async def test_png_falls_back_to_pil_and_prepare(server, model):
    tensor, decodes, prepares = await _load(f"{server}/good.png", model)
    assert (decodes, prepares) == (1, 1)  # decode said None (not a JPEG), PIL + prepare did it
    assert torch.equal(tensor, torch.from_numpy(_pixels()).permute(2, 0, 1))


async def test_without_decode_the_loader_returns_pil_images(server):
    loader = ImageLoader()
    try:
        image = await loader.load(f"{server}/good.jpg")
    finally:
        await loader.aclose()
    assert isinstance(image, Image.Image) and image.size == (W, H) and image.mode == "RGB"


async def test_a_failing_fast_decoder_falls_back_to_pil(server, model):
    def broken(data: bytes):
        raise RuntimeError("decoder exploded")

    loader = ImageLoader()
    try:
        tensor = await loader.load(f"{server}/good.jpg", model.prepare, broken)
    finally:
        await loader.aclose()
    assert torch.equal(tensor, _pil_tensor(JPEG))


@pytest.mark.parametrize(("path", "limits", "message", "decoded"), [
    ("/truncated.jpg", {}, "truncated", True),  # torchvision raises; PIL confirms and names it
    ("/garbage.jpg", {}, "not a readable image", False),
    ("/big.jpg", {"max_pixels": 100_000}, "500x400 pixels > 100000", False),  # header only, nothing decoded
    ("/big.jpg", {"max_bytes": 1000}, "image too large", False),
    ("/missing.jpg", {}, "HTTP 404", False),
])
async def test_bad_images_become_one_image_error(server, model, path, limits, message, decoded):
    loader = ImageLoader(**limits)
    decode = Spy(model.decode)
    try:
        with pytest.raises(ImageError, match=message) as info:
            await loader.load(f"{server}{path}", model.prepare, decode)
    finally:
        await loader.aclose()
    assert path in str(info.value)  # the URL is in the error result
    assert decode.calls == int(decoded)


async def test_prepare_failure_is_an_image_error(server):
    def broken(image):
        raise ValueError("no room")

    loader = ImageLoader()
    try:
        with pytest.raises(ImageError, match="image preparation failed: ValueError: no room"):
            await loader.load(f"{server}/good.png", broken)
    finally:
        await loader.aclose()
