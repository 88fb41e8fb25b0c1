"""Hostile input (issue 10): task bodies and image URLs are untrusted.

Every way a task or its image can be hostile ends as one clear error (a message an operator
understands: what, which URL truncated, why) and never as a crash, a hang, a fetch of a
forbidden URL or an unbounded read. Image tests run against real HTTP servers on 127.0.0.1
that misbehave on purpose. Also here: the embedded nats-server's durability setting.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from antenna_flows.imageloader import FORMATS, ImageError, ImageLoader, _host_allowed
from antenna_flows.jetstream import MAX_TASK_BYTES, MAX_TASK_ID_CHARS, loose_image_id, parse_task
from antenna_lab.antenna.natsserver import EmbeddedNats
from antenna_flows.models.ami import AmiModel
from antenna_flows.settings import WorkerSettings
from tests.helpers import Spy, serve_http


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) claims another size: what a crafted file looks like."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def _png_bomb(width: int, height: int) -> bytes:
    """A genuine decompression bomb: a 1-bit all-black PNG, tiny on the wire, width x height
    bytes once PIL decodes it (three times that as RGB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


JPEG = _jpeg()
BOMB = _png_bomb(12_000, 12_000)  # 144 Mpx: under PIL's own hard limit (179 Mpx), over ours (80 Mpx)
FILES = {
    "/good.jpg": JPEG,
    "/tall.jpg": _with_jpeg_size(JPEG, 2000, 2000),
    "/huge.jpg": _with_jpeg_size(JPEG, 60_000, 60_000),
    "/bomb.png": BOMB,
    "/eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
}
DRIP_SECONDS = 20
ENDLESS_BYTES = 256 * 1024 * 1024  # a server that would send this much (it stops when we hang up)

hits: Counter[str] = Counter()
sent: Counter[str] = Counter()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _write_until_refused(self, name: str, chunk: bytes, total: int, pause: float = 0.0) -> None:
        try:
            while sent[name] < total:
                self.wfile.write(chunk)
                self.wfile.flush()
                sent[name] += len(chunk)
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        hits[url.path] += 1
        query = parse_qs(url.query)
        if url.path in FILES:
            self._send(FILES[url.path])
        elif url.path.startswith("/hops/"):  # /hops/N: N more redirects, then the image
            n = int(url.path.rsplit("/", 1)[1])
            self._redirect("/good.jpg" if n <= 1 else f"/hops/{n - 1}")
        elif url.path == "/to":  # redirect wherever ?loc= says
            self._redirect(query["loc"][0])
        elif url.path == "/endless":  # no Content-Length: read until the server closes
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self._write_until_refused("endless", b"\xff" * 65536, ENDLESS_BYTES)
        elif url.path == "/liar":  # a small Content-Length, then chunked megabytes
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Claimed-Length", "1000")
            self.end_headers()
            piece = b"\x00" * 65536
            self._write_until_refused("liar", b"%x\r\n%b\r\n" % (len(piece), piece), ENDLESS_BYTES)
        elif url.path == "/gzip":  # small on the wire, 64 MB once decoded
            body = GZIP_BOMB
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif url.path == "/drip":  # a byte a second
            self.send_response(200)
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self._write_until_refused("drip", JPEG[:1], DRIP_SECONDS, pause=1.0)
        elif url.path == "/stall":  # accepts, never answers
            time.sleep(DRIP_SECONDS)
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


GZIP_BOMB = gzip.compress(b"\x00" * (64 * 1024 * 1024), compresslevel=1)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from serve_http(_Handler)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> AmiModel:
    return AmiModel(Path(tmp_path_factory.mktemp("weights")), device="cpu")  # decode needs no weights


async def _refused(url: str, message: str, model: AmiModel | None = None, **options) -> tuple[ImageError, float]:
    loader = ImageLoader(**options)
    decode = Spy(model.decode) if model else None
    start = time.monotonic()
    try:
        with pytest.raises(ImageError, match=message) as info:
            await loader.load(url, model.prepare if model else None, decode)
    finally:
        await loader.aclose()
    assert len(str(info.value)) < 600, "an error result must stay short, whatever the URL"
    if decode is not None:
        assert decode.calls == 0, "refused images are never handed to the decoder"
    return info.value, time.monotonic() - start


async def _load(url: str, **options):
    loader = ImageLoader(**options)
    try:
        return await loader.load(url)
    finally:
        await loader.aclose()


# --- URLs and redirects ------------------------------------------------------------------


@pytest.mark.parametrize(("url", "why"), [
    ("file:///etc/passwd", "scheme 'file' is not http or https"),
    ("ftp://127.0.0.1/good.jpg", "scheme 'ftp'"),
    ("gopher://127.0.0.1:70/_GET", "scheme 'gopher'"),
    ("data:image/jpeg;base64,/9j/4AAQSkZJRg==", "scheme 'data'"),
    ("127.0.0.1/good.jpg", "no scheme"),
    ("//127.0.0.1/good.jpg", "no scheme"),
    ("http:///good.jpg", "no host"),
    ("", "empty"),
    ("http://127.0.0.1/" + "a" * 60_000, "60017 characters"),
    ("http://127.0.0.1:99999/good.jpg", "port 99999 out of range"),
    ("http://127.0.0.1/a\r\nX-Forged: 1", "not a valid URL"),
    ("http://127.0.0.1/a\x00b", "not a valid URL"),
])
async def test_urls_that_are_not_http_are_refused_before_any_connection(server, url, why):
    before = sum(hits.values())
    error, _ = await _refused(url, f"refused image URL: {why}")
    assert sum(hits.values()) == before
    assert str(error).isprintable(), "control characters must not reach error results and logs"


async def test_redirects_are_followed_up_to_the_cap(server):
    image = await _load(f"{server}/hops/3", max_redirects=3)
    assert image.size == (64, 48)
    hits.clear()
    error, _ = await _refused(f"{server}/hops/4", "more than 3 redirects", max_redirects=3)
    assert hits["/good.jpg"] == 0 and "/hops/4" in str(error)
    await _refused(f"{server}/hops/1", "more than 0 redirects", max_redirects=0)


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/x", "data:,x"])
async def test_a_redirect_off_http_is_refused(server, target):
    error, _ = await _refused(f"{server}/to?loc={target}", "refused redirect")
    assert target.startswith("data:") or f"scheme '{target.split(':')[0]}' is not http or https" in str(error)


async def test_a_shared_client_that_follows_redirects_does_not_bypass_the_checks(server):
    async with httpx.AsyncClient(follow_redirects=True) as client:
        loader = ImageLoader(client, max_redirects=1)
        with pytest.raises(ImageError, match="scheme 'file'"):
            await loader.load(f"{server}/to?loc=file:///etc/passwd")
        with pytest.raises(ImageError, match="more than 1 redirects"):
            await loader.load(f"{server}/hops/2")


async def test_relative_redirects_work(server):
    assert (await _load(f"{server}/to?loc=/good.jpg")).size == (64, 48)


# --- allow-listed hosts ---------------------------------------------------------------------


async def test_hosts_off_the_allow_list_are_refused_unfetched(server):
    hits.clear()
    await _refused(f"{server}/good.jpg", r"host '127.0.0.1' is not in the allowed image hosts \(AMI_IMAGE_HOSTS=images.example.org\)",
                   hosts=["images.example.org"])
    assert hits["/good.jpg"] == 0
    assert (await _load(f"{server}/good.jpg", hosts=["images.example.org", "127.0.0.1"])).size == (64, 48)
    # a redirect to a host off the list (localhost is the same server, another name) is refused too
    port = server.rsplit(":", 1)[1]
    hits.clear()
    await _refused(f"{server}/to?loc=http://localhost:{port}/good.jpg", "refused redirect .* host 'localhost' is not in",
                   hosts=["127.0.0.1"])
    assert hits["/good.jpg"] == 0


def test_host_patterns() -> None:
    hosts = ("images.example.org", "*.s3.amazonaws.com", ".minio.lab")
    assert _host_allowed("images.example.org", hosts) and _host_allowed("IMAGES.example.org.", hosts)
    assert _host_allowed("ami-bucket.s3.amazonaws.com", hosts) and _host_allowed("a.b.minio.lab", hosts)
    assert not _host_allowed("s3.amazonaws.com", hosts)  # a wildcard needs a subdomain
    assert not _host_allowed("evil-s3.amazonaws.com.attacker.net", hosts)
    assert not _host_allowed("xminio.lab", hosts) and not _host_allowed("example.org", hosts)


async def test_image_hosts_setting_is_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMI_IMAGE_HOSTS", "images.example.org, *.s3.amazonaws.com")
    monkeypatch.setenv("AMI_IMAGE_TIMEOUT_S", "7")
    settings = WorkerSettings()
    assert settings.image_hosts == ["images.example.org", "*.s3.amazonaws.com"]
    assert settings.image_max_redirects == 3
    loader = ImageLoader.from_settings(settings)
    assert loader.hosts == ("images.example.org", "*.s3.amazonaws.com") and loader.timeout_s == 7
    assert (loader.max_redirects, loader.max_bytes, loader.max_pixels) == (3, settings.image_max_bytes, settings.image_max_pixels)
    await loader.aclose()
    monkeypatch.delenv("AMI_IMAGE_HOSTS")
    assert WorkerSettings().image_hosts == []  # empty: any host


# --- bodies: size, time ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/endless", "/liar"])
async def test_bodies_over_the_limit_are_cut_off_while_streaming(server, path):
    name = path.strip("/")
    sent[name] = 0
    error, seconds = await _refused(f"{server}{path}", "image too large: more than 1000000 bytes, download cut off",
                                    max_bytes=1_000_000)
    time.sleep(0.2)  # let the server notice the hang-up
    assert sent[name] < 32 * 1024 * 1024, f"the server got to send {sent[name]} bytes"
    assert seconds < 5


async def test_a_gzip_bomb_is_cut_off_at_the_decoded_size(server):
    assert len(GZIP_BOMB) < 1_000_000  # it would pass a check of the bytes on the wire
    await _refused(f"{server}/gzip", "more than 1000000 bytes, download cut off", max_bytes=1_000_000)


@pytest.mark.parametrize("path", ["/drip", "/stall"])
async def test_slow_servers_hit_a_total_deadline(server, path):
    _, seconds = await _refused(f"{server}{path}", r"took longer than 1\.5 s in total", timeout_s=1.5)
    assert 1.4 < seconds < 3.5  # one deadline for the download, not 1.5 s per read


# --- pixels: refused from the header, before any decoder runs ------------------------------


async def test_a_png_decompression_bomb_is_refused_from_its_header(server, model):
    assert len(BOMB) < 100_000  # 144 Mpx (432 MB as RGB) in a file this small
    error, seconds = await _refused(f"{server}/bomb.png", r"image too large: 12000x12000 pixels > 80000000, refused before decoding",
                                    model)
    assert seconds < 2


@pytest.mark.parametrize(("path", "limits", "message"), [
    ("/tall.jpg", {"max_pixels": 1_000_000}, "2000x2000 pixels > 1000000, refused before decoding"),
    ("/huge.jpg", {}, r"image too large \(decompression bomb\)"),  # 3.6 Gpx: PIL's own limit trips first
])
async def test_absurd_jpeg_dimensions_never_reach_the_fast_decoder(server, model, path, limits, message):
    await _refused(f"{server}{path}", message, model, **limits)


async def test_formats_outside_the_raster_list_are_refused(server, model):
    await _refused(f"{server}/eps", r"not a readable image \(not one of JPEG", model)
    assert "EPS" not in FORMATS


# --- task bodies -------------------------------------------------------------------------------


def _task(image_id: str = "1", **extra: str) -> bytes:
    return json.dumps({"id": "1", "image_id": image_id, "image_url": "http://x/1.jpg", **extra}).encode()


@pytest.mark.parametrize(("body", "message"), [
    (b"", "Invalid JSON"),
    (b"not json", "Invalid JSON"),
    (b"\xff\xfe\x00{", "Invalid JSON"),
    (b'{"id": "1", "image_id": "\xff\xfe", "image_url": "http://x/1.jpg"}', "invalid unicode"),
    (b"[]", "Input should be an object"),
    (b"null", "Input should be an object"),
    (b'{"id": "1", "image_id": "1"}', "Field required at image_url"),
    (b'{"id": 1, "image_id": ["1"], "image_url": "http://x"}', "Input should be a valid string at"),
    (b"[" * 10_000 + b"]" * 10_000, "recursion limit"),
    (_task("9" * (MAX_TASK_ID_CHARS + 1)), f"image_id of {MAX_TASK_ID_CHARS + 1} characters, more than {MAX_TASK_ID_CHARS}"),
    (_task("1" * 1_000_000), f"body of {len(_task('1' * 1_000_000))} bytes, more than {MAX_TASK_BYTES}"),
    (b" " * (MAX_TASK_BYTES + 1), "more than 65536"),
])
def test_malformed_task_bodies_are_clear_errors_never_exceptions(body, message):
    start = time.perf_counter()
    task, error = parse_task(body)
    assert task is None and error is not None and error.startswith("malformed task: ")
    assert message in error and len(error) < 300, error  # never echoes a huge body
    loose = loose_image_id(body)  # what the worker reads from a malformed body to answer it
    assert loose is None or len(loose) <= MAX_TASK_ID_CHARS
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("body", [b"[" * 30_000 + b"]" * 30_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000])
def test_deeply_nested_bodies_under_the_size_limit(body):
    assert len(body) <= MAX_TASK_BYTES
    assert parse_task(body) == (None, parse_task(body)[1]) and "recursion limit" in parse_task(body)[1]
    assert loose_image_id(body) is None  # the stdlib json parser raises RecursionError here


def test_a_well_formed_task_still_parses():
    task, error = parse_task(_task("12345", reply_subject="$JS.ACK.x", unknown="ignored"))
    assert error is None and task is not None and task.image_id == "12345"
    assert loose_image_id(b'{"image_id": 12345, "image_url": 5}') == "12345"  # malformed, but names its image
    assert parse_task(_task("9" * MAX_TASK_ID_CHARS))[1] is None  # the limit itself is fine


# --- NATS durability -------------------------------------------------------------------------


def test_embedded_nats_fsyncs_every_write(tmp_path: Path):
    """The devstack's JetStream fsyncs each write before acking it (sync_interval: always), so a
    crash of the one small server loses no acknowledged task (see docs/nats-durability.md).
    Checked in the running server's own view of its config (/varz), not just in our file."""
    with EmbeddedNats(store_dir=tmp_path / "store", monitor_port=0) as nats:
        assert "sync_interval: always" in nats.config_file.read_text()
        config = httpx.get(f"http://127.0.0.1:{nats.monitor_port}/varz", timeout=5).json()["jetstream"]["config"]
        assert config["sync_always"] is True
        assert config["store_dir"] == str(tmp_path / "store" / "jetstream")
    # a duration is written quoted: unquoted, nats-server reads 2m as 2,000,000 seconds
    with EmbeddedNats(store_dir=tmp_path / "relaxed", sync_interval="2m", monitor_port=0) as nats:
        assert 'sync_interval: "2m"' in nats.config_file.read_text()
        config = httpx.get(f"http://127.0.0.1:{nats.monitor_port}/varz", timeout=5).json()["jetstream"]["config"]
        assert config["sync_interval"] == 120 * 10**9 and not config.get("sync_always")
