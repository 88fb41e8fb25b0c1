"""Weight files and label maps: found in ``weights_dir`` or downloaded there once, never silently.

A worker must not start fetching hundreds of megabytes in the middle of a job unless it was
told it may, so a missing file is a :class:`MissingWeights` error that says which file, where
it was looked for, and the two ways to get it (download it yourself, or allow the worker to).
Downloads go to a temporary file, are checked against the registry's sha256 when one is
known, and are renamed into place atomically, so a crashed or concurrent download never
leaves a half file that a later load would trust.

No pydantic and no torch at import: the GPU benchmark loads weights through this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antenna_flows.models.registry import RemoteFile

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60.0


class MissingWeights(FileNotFoundError):
    """A weights or label-map file is not present and downloading is not allowed."""


class ChecksumMismatch(ValueError):
    """A file's sha256 is not the one the registry expects."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(file: RemoteFile, weights_dir: Path, *, allow_download: bool, what: str = "model file") -> Path:
    """Local path of ``file``: ``weights_dir/<basename of its URL>``, downloaded first if allowed."""
    path = Path(weights_dir).expanduser() / file.filename
    if path.is_file():
        if file.sha256 and sha256_of(path) != file.sha256:
            raise ChecksumMismatch(f"{path} does not match sha256 {file.sha256}; delete it and fetch {file.url} again")
        return path
    if not allow_download:
        raise MissingWeights(
            f"{what}: {file.filename} is not in {path.parent}. Get it with\n"
            f"  mkdir -p {path.parent} && curl -fL -o {path} {file.url}\n"
            f"or let the worker download it once: AMI_ALLOW_WEIGHT_DOWNLOAD=true "
            f"(AMI_WEIGHTS_DIR chooses the directory)."
        )
    download(file, path)
    return path


def download(file: RemoteFile, dest: Path) -> None:
    """Stream ``file.url`` into ``dest`` via a temporary file, verify, then rename atomically."""
    import httpx  # noqa: PLC0415 - only needed when downloading

    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", file.url, dest)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, httpx.stream(
            "GET", file.url, follow_redirects=True, timeout=DOWNLOAD_TIMEOUT_S
        ) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if file.sha256 and digest.hexdigest() != file.sha256:
            raise ChecksumMismatch(f"{file.url} has sha256 {digest.hexdigest()}, expected {file.sha256}")
        os.replace(tmp, dest)
        log.info("downloaded %s (sha256 %s)", dest, digest.hexdigest())
    finally:
        tmp.unlink(missing_ok=True)


def load_label_map(path: Path) -> list[str]:
    """Labels in class-index order from a category-map JSON.

    Upstream files map label -> index (``{"moth": 0, "nonmoth": 1}``); index -> label objects
    and plain lists are accepted too. The indices must be exactly 0..n-1.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, list):
        pairs = list(enumerate(data))
    elif isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        pairs = [(index, label) for label, index in data.items()]
    elif isinstance(data, dict) and all(str(k).lstrip("-").isdigit() for k in data):
        pairs = [(int(index), label) for index, label in data.items()]
    else:
        raise ValueError(f"{path}: not a category map (expected {{label: index}}, {{index: label}} or a list)")
    labels = dict(pairs)
    if sorted(labels) != list(range(len(pairs))):
        raise ValueError(f"{path}: class indices are not exactly 0..{len(pairs) - 1}")
    return [str(labels[i]) for i in range(len(labels))]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict in a checkpoint, nested under ``model_state_dict`` or not (as upstream).

    Loads with ``weights_only`` first; a published checkpoint that also pickles training
    objects falls back to a full unpickle, as upstream's plain ``torch.load`` would.
    """
    import torch  # noqa: PLC0415

    try:
        checkpoint: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("%s holds more than tensors; loading it with a full unpickle (trusted model store file)", path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(checkpoint, dict) and "model_state_dict" in checkpoint:
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(checkpoint).__name__}")
    return checkpoint
