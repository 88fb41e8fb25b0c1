"""Crop detections out of their images and resize them for a classifier.

Upstream resizes each crop on its own (``ToTensor`` then ``Resize(antialias=True)``, or PIL's
bilinear resize, the same triangle filter). On the CPU that is still the fastest way and is
what runs here. On a GPU, one small call per crop (hundreds per 4K frame) leaves the device
waiting on Python, so the same filter is written as two matrix products per crop and crops of
similar size are gathered into one padded tensor and resized in a single batched call; the
padding gets zero weight, so both paths agree to float rounding (tested against each other).
"""

from __future__ import annotations

from collections import defaultdict

import torch

# Elements (crops x rows x cols x 3) gathered per call; bounds the temporary memory (~256 MB fp32).
GATHER_BUDGET = 1 << 26
MIN_BUCKET = 16


def _bucket(length: int) -> int:
    """Next power of two, so a handful of padded shapes serve every crop size."""
    return max(MIN_BUCKET, 1 << (int(length) - 1).bit_length())


def resize_weights(lengths: torch.Tensor, size: int, bucket: int) -> torch.Tensor:
    """(n, size, bucket) row-normalised antialiased-bilinear weights; zero beyond each crop's length."""
    lengths = lengths.to(torch.float32)
    scale = lengths / size
    support = scale.clamp(min=1.0)
    centers = scale[:, None] * (torch.arange(size, dtype=torch.float32, device=lengths.device) + 0.5)
    positions = torch.arange(bucket, dtype=torch.float32, device=lengths.device)
    weights = (1.0 - (positions + 0.5 - centers[:, :, None]).abs() / support[:, None, None]).clamp(min=0.0)
    weights = weights * (positions < lengths[:, None, None])
    return weights / weights.sum(-1, keepdim=True)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """(B, H, W, 3) uint8 from HWC uint8 images, zero-padded to the largest (mixed sizes)."""
    if len({tuple(im.shape) for im in images}) == 1:
        return torch.stack(images)
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    batch = images[0].new_zeros((len(images), height, width, 3))
    for i, im in enumerate(images):
        batch[i, : im.shape[0], : im.shape[1]] = im
    return batch


def crop_and_resize(
    batch: torch.Tensor,
    image_index: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    batched: bool | None = None,
) -> torch.Tensor:
    """Normalised (n, 3, size, size) float32 crops.

    ``batch``: (B, H, W, 3) uint8 on the compute device (see :func:`stack_images`);
    ``image_index``: (n,) int64 and ``boxes``: (n, 4) int64 x1, y1, x2, y2 (pixels, non-empty),
    both on the CPU (they drive the Python side, so they are never read back from the device).
    ``batched``: the matrix-product path; default on CUDA only.
    """
    if batched is None:
        batched = batch.device.type == "cuda"
    out = (_resize_batched if batched else _resize_one_by_one)(batch, image_index, boxes, size)
    scale = torch.tensor(std, device=batch.device).mul(255.0).view(1, 3, 1, 1)
    shift = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
    return out.div_(scale).sub_(shift.div(scale / 255.0))


def _resize_one_by_one(batch: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Upstream's way: each crop through ``F.interpolate(antialias=True)``; 0..255 floats."""
    out = torch.empty((len(boxes), 3, size, size), dtype=torch.float32, device=batch.device)
    for i, (b, (x1, y1, x2, y2)) in enumerate(zip(image_index.tolist(), boxes.tolist())):
        crop = batch[b, y1:y2, x1:x2].permute(2, 0, 1).float()[None]
        out[i] = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
    return out


def _resize_batched(batch: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops grouped by padded size, each group resized by two batched matmuls; 0..255 floats."""
    device = batch.device
    n = len(boxes)
    out = torch.empty((n, 3, size, size), dtype=torch.float32, device=device)
    if n == 0:
        return out
    heights = (boxes[:, 3] - boxes[:, 1]).tolist()
    widths = (boxes[:, 2] - boxes[:, 0]).tolist()
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (h, w) in enumerate(zip(heights, widths)):
        groups[(_bucket(h), _bucket(w))].append(i)
    for (bucket_h, bucket_w), members in groups.items():
        per_call = max(1, GATHER_BUDGET // (bucket_h * bucket_w * 3))
        for start in range(0, len(members), per_call):
            rows = torch.tensor(members[start : start + per_call])
            out[rows.to(device)] = _resize_group(batch, image_index[rows], boxes[rows], size, bucket_h, bucket_w)
    return out


def _resize_group(batch: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                  size: int, bucket_h: int, bucket_w: int) -> torch.Tensor:
    """(n, 3, size, size) resized 0..255 floats for crops that fit a (bucket_h, bucket_w) window."""
    device = batch.device
    x1, y1, x2, y2 = boxes.unbind(1)
    # Window rows/cols past the crop repeat its last row/col; their weights are zero anyway.
    rows = torch.minimum(y1[:, None] + torch.arange(bucket_h), (y2 - 1)[:, None])
    cols = torch.minimum(x1[:, None] + torch.arange(bucket_w), (x2 - 1)[:, None])
    windows = batch[image_index.to(device)[:, None, None], rows.to(device)[:, :, None], cols.to(device)[:, None, :]]
    windows = windows.permute(0, 3, 1, 2).float()  # (n, 3, bucket_h, bucket_w)
    weights_y = resize_weights((y2 - y1).to(device), size, bucket_h)  # (n, size, bucket_h)
    weights_x = resize_weights((x2 - x1).to(device), size, bucket_w)  # (n, size, bucket_w)
    return weights_y[:, None] @ windows @ weights_x[:, None].transpose(-1, -2)
