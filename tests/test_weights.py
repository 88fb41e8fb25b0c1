"""Weight files: local first, a download only when allowed (once, verified, atomic), clear errors."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from antenna_flows.models.registry import RemoteFile
from antenna_flows.models.weights import ChecksumMismatch, MissingWeights, load_label_map, load_state_dict, resolve

from tests.helpers import QuietHTTPServer

PAYLOAD = b"not really weights" * 1000


class _Files(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.hits.append(self.path)
        if self.path != "/models/w.pth":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def store() -> Iterator[str]:
    _Files.hits = []
    server = QuietHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_local_file_is_used_without_network(tmp_path: Path) -> None:
    (tmp_path / "w.pth").write_bytes(PAYLOAD)
    assert resolve(RemoteFile("http://127.0.0.1:9/models/w.pth"), tmp_path, allow_download=False) == tmp_path / "w.pth"


def test_missing_file_without_download_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(MissingWeights) as err:
        resolve(RemoteFile("https://store.example/models/w.pth"), tmp_path, allow_download=False, what="weights of 'X'")
    message = str(err.value)
    assert "w.pth" in message and str(tmp_path) in message and "https://store.example/models/w.pth" in message
    assert "AMI_ALLOW_WEIGHT_DOWNLOAD=true" in message


def test_download_once_with_checksum(tmp_path: Path, store: str) -> None:
    file = RemoteFile(f"{store}/models/w.pth", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    path = resolve(file, tmp_path / "cache", allow_download=True)
    assert path.read_bytes() == PAYLOAD
    assert resolve(file, tmp_path / "cache", allow_download=True) == path
    assert _Files.hits == ["/models/w.pth"]  # the second resolve found the cached file
    assert [p.name for p in path.parent.iterdir()] == ["w.pth"]  # no temporary left behind


def test_bad_checksum_leaves_nothing(tmp_path: Path, store: str) -> None:
    file = RemoteFile(f"{store}/models/w.pth", sha256="0" * 64)
    with pytest.raises(ChecksumMismatch):
        resolve(file, tmp_path, allow_download=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "w.pth").write_bytes(b"corrupt")
    with pytest.raises(ChecksumMismatch, match="delete it"):
        resolve(file, tmp_path, allow_download=False)


def test_http_error_is_raised(tmp_path: Path, store: str) -> None:
    with pytest.raises(Exception, match="404"):
        resolve(RemoteFile(f"{store}/models/missing.pth"), tmp_path, allow_download=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [{"moth": 0, "nonmoth": 1}, {"0": "moth", "1": "nonmoth"}, ["moth", "nonmoth"],
                                     {"nonmoth": 1, "moth": 0}])
def test_label_map_formats(tmp_path: Path, content: object) -> None:
    (tmp_path / "map.json").write_text(json.dumps(content))
    assert load_label_map(tmp_path / "map.json") == ["moth", "nonmoth"]


@pytest.mark.parametrize("content", [{"a": 0, "b": 2}, {"a": "x"}, 3])
def test_bad_label_maps(tmp_path: Path, content: object) -> None:
    (tmp_path / "map.json").write_text(json.dumps(content))
    with pytest.raises(ValueError):
        load_label_map(tmp_path / "map.json")


def test_state_dict_nested_or_not(tmp_path: Path) -> None:
    state = {"w": torch.ones(2)}
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"model_state_dict": state, "epoch": 3}, tmp_path / "nested.pt")
    for name in ("plain.pt", "nested.pt"):
        assert torch.equal(load_state_dict(tmp_path / name)["w"], torch.ones(2))
