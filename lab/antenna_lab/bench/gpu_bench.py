#!/usr/bin/env python3
"""One-shot throughput benchmark of the AMI pipeline (detector -> moth filter -> species model).

Runs the real architectures with random weights (written to a temporary weights directory in
the published formats and loaded through the worker's own loading code; nothing downloads)
on synthetic trap frames: a light sheet with dark, moth-sized ellipses. Reports images/s,
seconds per stage and how busy the GPU was, for each precision x batch size x input kind
("pil": PIL images converted on the inference thread, as the worker passes them now;
"pinned": tensors prepared beforehand, as ``AmiModel.host_tensor`` does in a loader thread).
"to_lists" is the conversion of every score and logit to Python floats that building the
Antenna results needs (the pydantic objects themselves are not built here).

Detections are injected: random detector weights find arbitrary boxes, so the detector runs
in full (its time is real) but its output is replaced by the drawn moths' boxes, and the moth
filter is biased to call every crop a moth, so the species model classifies every crop (the
most classifier work a frame can cause). GPU busy = union of CUDA kernel/memcpy intervals
from torch.profiler over one extra batch / that batch's wall time (plus nvidia-smi's sampled
utilisation over the timed batches when the tool is present).

Needs only torch, torchvision, timm, numpy and pillow (no pydantic): the package's
``antenna_flows.models`` __init__ (which imports the worker settings) is bypassed.

    python3 lab/antenna_lab/bench/gpu_bench.py                 # GPU, 4096x2160 (writes $OUT/gpu_bench.json)
    python3 lab/antenna_lab/bench/gpu_bench.py --cpu           # this machine's CPU, 640x480
    python3 lab/antenna_lab/bench/gpu_bench.py --cpu --small   # smoke test, a few seconds

``--feed`` measures what the worker does instead (writes $OUT/gpu_feed.json): 4096x2160 JPEG
bytes in memory, decoded + prepared by a pool of N threads for the next batches while the
current one runs (bf16, batch 16), per decode method: "pil" (PIL decode + host_tensor, the
loader's fallback path), "torchvision" (``Engine.decode``: libjpeg-turbo straight to a pinned
tensor, the loader's fast path), "nvjpeg" (threads only wrap the bytes; the slot thread
batch-decodes them on the GPU before the pipeline) and "predecoded" (tensors made beforehand:
the ceiling). Reports images/s, how busy the slot and the GPU were, and decode ms per image.

    python3 lab/antenna_lab/bench/gpu_bench.py --feed                   # GPU
    python3 lab/antenna_lab/bench/gpu_bench.py --feed --cpu --small     # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]


def _import_models() -> tuple[Any, Any, Any, Any]:
    """engine, fakes, nets and registry without running antenna_flows/models/__init__.py."""
    sys.path.insert(0, str(ROOT))
    package = types.ModuleType("antenna_flows.models")
    package.__path__ = [str(ROOT / "antenna_flows" / "models")]
    sys.modules.setdefault("antenna_flows.models", package)
    from antenna_flows.models import engine, fakes, nets, registry  # noqa: PLC0415

    return engine, fakes, nets, registry


engine_mod, fakes, nets, registry = _import_models()


# --- synthetic frames ---------------------------------------------------------------------


def synth_frames(count: int, width: int, height: int, moths: int, seed: int = 0) -> tuple[list[Image.Image], list[torch.Tensor]]:
    """Light noisy sheets with ``moths`` dark ellipses each; returns the images and their boxes."""
    rng = np.random.default_rng(seed)
    scale = max(width, height) / 4096
    frames, boxes = [], []
    for _ in range(count):
        sheet = (185 + rng.integers(0, 25, (height, width, 1), dtype=np.uint8)).repeat(3, axis=2)
        frame_boxes = []
        for _ in range(moths):
            ax, ay = (rng.uniform(30, 120, 2) * scale).clip(3)
            cx, cy = rng.uniform(ax, width - ax), rng.uniform(ay, height - ay)
            x1, y1, x2, y2 = int(cx - ax), int(cy - ay), int(cx + ax) + 1, int(cy + ay) + 1
            yy, xx = np.ogrid[y1:y2, x1:x2]
            inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
            sheet[y1:y2, x1:x2][inside] = rng.integers(20, 110, 3, dtype=np.uint8)
            frame_boxes.append((x1, y1, x2, y2))
        frames.append(Image.fromarray(sheet))
        boxes.append(torch.tensor(frame_boxes, dtype=torch.float32))
    return frames, boxes


class InjectBoxes(torch.nn.Module):
    """Runs the real detector, then answers with the boxes set in ``boxes`` (score 1)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.boxes: list[torch.Tensor] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.inner(images)
        return [{"boxes": b.to(images[0].device), "scores": torch.ones(len(b), device=images[0].device),
                 "labels": torch.ones(len(b), dtype=torch.int64, device=images[0].device)} for b in self.boxes]


def write_weights(pipeline: Any, weights_dir: Path, species_classes: int | None) -> None:
    """Random weights for every stage; the moth filter's head is biased to say "moth"."""
    fakes.write_random_pipeline(pipeline, weights_dir, num_classes=species_classes)
    binary = pipeline.binary
    if binary is not None:
        net = nets.build_classifier(binary, 2)
        with torch.no_grad():
            net.fc.bias.copy_(torch.tensor([50.0, -50.0]))  # labels are ["moth", "nonmoth"]
        fakes.write_weights(binary, weights_dir, net)


# --- measurement --------------------------------------------------------------------------


class SmiSampler:
    """nvidia-smi utilization.gpu sampled every 100 ms while running (None without the tool)."""

    def __init__(self, device_index: int):
        self.device_index = device_index
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> SmiSampler:
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.device_index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()

    def mean(self) -> float | None:
        if not self.proc:
            return None
        out, _ = self.proc.communicate(timeout=5)
        values = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
        return round(statistics.fmean(values) / 100, 3) if values else None


def gpu_busy_fraction(run_batch: Any) -> float | None:
    """Union of CUDA activity intervals during one batch / the batch's wall time (None if the
    profiler recorded no device activity)."""
    from torch.autograd import DeviceType  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run_batch()
        wall_us = (time.perf_counter() - start) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if getattr(e, "device_type", None) == DeviceType.CUDA)
    if not spans:
        return None
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return round(min(1.0, busy / wall_us), 3)


def bench_config(engine: Any, models: dict[str, Any], frames: list[Image.Image], boxes: list[torch.Tensor],
                 batch_size: int, inputs: str, warmup: int, batches: int, busy: bool) -> dict[str, Any]:
    detector, binary, classifier = models["detector"], models["binary"], models["classifier"]
    pool = frames if inputs == "pil" else [engine.host_tensor(f) for f in frames]
    state = {"i": 0}

    def run_batch() -> Any:
        """One slot's worth of work: the pipeline, then every score and logit as Python floats
        (what AmiModel does to build the results)."""
        picks = [(state["i"] + k) % len(pool) for k in range(batch_size)]
        state["i"] += batch_size
        detector.module.boxes = [boxes[p] for p in picks]
        out = engine.run([pool[p] for p in picks], classifier, detector=detector, binary=binary)
        lists_start = time.perf_counter()
        for stage in (out.binary, out.terminal):
            if stage is not None:
                stage.scores.tolist(), stage.logits.tolist()
        out.timings["to_lists"] = time.perf_counter() - lists_start
        return out

    for _ in range(warmup):
        run_batch()
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    stage_totals: dict[str, float] = {}
    crops = 0
    with SmiSampler(engine.device.index or 0) if engine.device.type == "cuda" else _null() as smi:
        start = time.perf_counter()
        for _ in range(batches):
            out = run_batch()
            crops += len(out.boxes)
            for stage, seconds in out.timings.items():
                stage_totals[stage] = stage_totals.get(stage, 0.0) + seconds
        wall = time.perf_counter() - start
    result = {
        "precision": engine.precision, "batch_size": batch_size, "inputs": inputs,
        "images_per_s": round(batches * batch_size / wall, 2),
        "batch_s": round(wall / batches, 4),
        "stage_s_per_batch": {k: round(v / batches, 4) for k, v in stage_totals.items()},
        "crops_per_image": round(crops / (batches * batch_size), 1),
    }
    if engine.device.type == "cuda":
        result["gpu_util_nvidia_smi"] = smi.mean()
        result["max_memory_gb"] = round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 2)
        if busy:
            result["gpu_busy_fraction"] = gpu_busy_fraction(run_batch)
    return result


def decode_costs(frame: Image.Image, device: str, count: int) -> dict[str, float]:
    """ms per image to get one JPEG frame (quality 90) into a uint8 tensor, three ways: what the
    worker's loader does now (PIL decode + conversion), torchvision's CPU decoder, and nvjpeg on
    the GPU for a batch of ``count`` frames. Informs where decoding should happen."""
    import io  # noqa: PLC0415

    from torchvision.io import decode_jpeg  # noqa: PLC0415

    buffer = io.BytesIO()
    frame.save(buffer, "JPEG", quality=90)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def ms(fn: Any, n: int, per: int = 1) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return round((time.perf_counter() - start) * 1000 / (n * per), 2)

    costs = {"jpeg_kib": len(data) // 1024,
             "pil_decode_and_convert": ms(lambda: np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")), 3),
             "torchvision_cpu_decode": ms(lambda: decode_jpeg(data), 3)}
    if device == "cuda":
        costs["nvjpeg_batch_decode"] = ms(lambda: decode_jpeg([data] * count, device="cuda"), 3, count)
    return costs


FEED_METHODS = ("pil", "torchvision", "nvjpeg", "predecoded")


class Feed:
    """A stream of JPEG frames decoded by ``threads`` pool threads, ``ahead`` batches ahead of
    the batch on the slot (the worker's loader prepares reserved images the same way).

    ``run(n)`` runs ``n`` batches on the calling thread (the slot) and returns the wall time,
    the time the slot waited for decoded images, the time in the pipeline and the per-image
    decode seconds (in-thread wall time for CPU methods, slot time for nvjpeg)."""

    def __init__(self, engine: Any, models: dict[str, Any], jpegs: list[bytes], boxes: list[torch.Tensor],
                 batch_size: int, method: str, threads: int, ahead: int = 2):
        import io  # noqa: PLC0415
        from collections import deque  # noqa: PLC0415
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415

        self.engine, self.models, self.jpegs, self.boxes = engine, models, jpegs, boxes
        self.batch_size, self.method, self.ahead = batch_size, method, ahead
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.pending: deque[Any] = deque()
        self.next_index = self.consumed = 0
        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        predecoded = [engine.decode(j) for j in jpegs] if method == "predecoded" else []

        def pil(data: bytes) -> torch.Tensor:  # what ImageLoader.decode + AmiModel.host_tensor do
            image = Image.open(io.BytesIO(data))
            image.load()
            return engine.host_tensor(image.convert("RGB") if image.mode != "RGB" else image)

        self._decode = {
            "pil": pil,
            "torchvision": engine.decode,
            "nvjpeg": lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "predecoded": None,
        }[method]
        self._predecoded = predecoded

    def _work(self, index: int) -> tuple[Any, float]:
        start = time.perf_counter()
        frame = index % len(self.jpegs)
        value = self._predecoded[frame] if self._decode is None else self._decode(self.jpegs[frame])
        return value, time.perf_counter() - start

    def _fill(self, upto: int) -> None:
        while self.next_index < upto:
            self.pending.append((self.next_index, self.pool.submit(self._work, self.next_index)))
            self.next_index += 1

    def run(self, batches: int) -> dict[str, Any]:
        detector, binary, classifier = self.models["detector"], self.models["binary"], self.models["classifier"]
        waited = busy = 0.0
        decode_s: list[float] = []
        start = time.perf_counter()
        for _ in range(batches):
            self._fill(self.consumed + (1 + self.ahead) * self.batch_size)
            t = time.perf_counter()
            picks, images = [], []
            for _ in range(self.batch_size):
                index, future = self.pending.popleft()
                value, seconds = future.result()
                picks.append(index % len(self.jpegs))
                images.append(value)
                decode_s.append(seconds)
            self.consumed += self.batch_size
            self._fill(self.consumed + (1 + self.ahead) * self.batch_size)  # decode ahead while this batch runs
            t2 = time.perf_counter()
            waited += t2 - t
            if self.method == "nvjpeg":
                device = "cuda" if self.engine.device.type == "cuda" else "cpu"
                images = self._decode_jpeg(images, mode=self._rgb, device=device)
                if device == "cuda":
                    torch.cuda.synchronize(self.engine.device)
                decode_s[-self.batch_size:] = [(time.perf_counter() - t2) / self.batch_size] * self.batch_size
            detector.module.boxes = [self.boxes[p] for p in picks]
            out = self.engine.run(images, classifier, detector=detector, binary=binary)
            for stage in (out.binary, out.terminal):
                if stage is not None:
                    stage.scores.tolist(), stage.logits.tolist()
            busy += time.perf_counter() - t2
        return {"wall": time.perf_counter() - start, "waited": waited, "busy": busy, "decode_s": decode_s}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def bench_feed(engine: Any, models: dict[str, Any], jpegs: list[bytes], boxes: list[torch.Tensor], batch_size: int,
               method: str, threads: int, warmup: int, batches: int, busy_batches: int) -> dict[str, Any]:
    feed = Feed(engine, models, jpegs, boxes, batch_size, method, threads)
    try:
        feed.run(warmup)
        with SmiSampler(engine.device.index or 0) if engine.device.type == "cuda" else _null() as smi:
            r = feed.run(batches)
        decode = r["decode_s"]
        result = {
            "method": method, "threads": threads, "precision": engine.precision, "batch_size": batch_size,
            "images_per_s": round(batches * batch_size / r["wall"], 2),
            "batch_s": round(r["wall"] / batches, 4),
            "slot_busy_fraction": round(r["busy"] / r["wall"], 3),
            "slot_wait_s_per_batch": round(r["waited"] / batches, 4),
            "decode_ms_per_image": round(1000 * statistics.fmean(decode), 2),
            "decode_ms_p90": round(1000 * sorted(decode)[int(0.9 * (len(decode) - 1))], 2),
            "decode_where": {"nvjpeg": "slot (GPU, batched)", "predecoded": "none"}.get(method, "pool threads (CPU)"),
        }
        if engine.device.type == "cuda":
            result["gpu_util_nvidia_smi"] = smi.mean()
            if busy_batches:
                result["gpu_busy_fraction"] = gpu_busy_fraction(lambda: feed.run(busy_batches))
        return result
    finally:
        feed.close()


def encode_jpegs(frames: list[Image.Image], quality: int = 90) -> list[bytes]:
    import io  # noqa: PLC0415

    out = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def main_feed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The fed pipeline: decode threads feeding the slot, per decode method and thread count."""
    started = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --cpu")
    width, height = map(int, (args.size or ("640x480" if args.cpu else "4096x2160")).lower().split("x"))
    if args.small:
        width, height = min(width, 320), min(height, 240)
    batch_size = int((args.batch_sizes or ("2" if args.small else "4" if args.cpu else "16")).split(",")[0])
    precision = (args.precisions or ("fp32" if args.cpu else "bf16")).split(",")[0]
    threads = [int(t) for t in (args.threads or ("2" if args.cpu else "8,16")).split(",")]
    methods = (args.methods or ",".join(FEED_METHODS)).split(",")
    unknown = set(methods) - set(FEED_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)} (of {', '.join(FEED_METHODS)})")
    moths = 3 if args.small else args.moths
    batches = args.batches or (2 if args.small else 3 if args.cpu else 10)
    warmup = 1 if args.small else args.warmup
    pipeline = registry.get_pipeline(args.pipeline)
    if args.small:
        pipeline = dataclasses.replace(pipeline, detector=dataclasses.replace(pipeline.detector, min_size=160, max_size=224))
    weights_dir = Path(tempfile.mkdtemp(prefix="ami-bench-weights-"))
    report: dict[str, Any] = {
        "mode": "feed",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "cpu_cores": os.cpu_count(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        "pipeline": pipeline.slug, "image_size": [width, height], "moths_per_frame": moths,
        "method": "JPEG bytes (quality 90) in memory, decoded by a thread pool 2 batches ahead of the slot; "
                  "random weights, injected boxes (see gpu_bench.py); gpu_busy_fraction over extra profiled "
                  "batches of the same fed loop (waits included)",
        "configs": [],
    }
    out_path = Path(args.out) / "gpu_feed.json" if args.out else None
    try:
        t = time.perf_counter()
        write_weights(pipeline, weights_dir, species_classes=None if not args.small else 20)
        frames, boxes = synth_frames(4 if args.small else 8, width, height, moths)
        jpegs = encode_jpegs(frames)
        report["jpeg_kib"] = [len(j) // 1024 for j in jpegs]
        report["setup_s"] = round(time.perf_counter() - t, 1)
        print(f"setup {report['setup_s']}s: {len(jpegs)} JPEGs {width}x{height}, {moths} moths each", flush=True)
        report["decode_ms_per_image_single"] = decode_costs(frames[0], device, batch_size)
        print("decode ms/image", json.dumps(report["decode_ms_per_image_single"]), flush=True)
        del frames
        engine = engine_mod.Engine(weights_dir, device=device, precision=precision)
        models = {"detector": engine.load_detector(pipeline.detector),
                  "binary": engine.load_classifier(pipeline.binary) if pipeline.binary else None,
                  "classifier": engine.load_classifier(pipeline.classifier)}
        models["detector"].module = InjectBoxes(models["detector"].module)
        plan = [(m, n) for m in methods for n in (threads if m in ("pil", "torchvision") else threads[:1])]
        for method, n in plan:
            if time.perf_counter() - started > args.budget_s:
                report.setdefault("skipped", []).append(f"{method}/{n}")
                continue
            result = bench_feed(engine, models, jpegs, boxes, batch_size, method, n, warmup, batches,
                                busy_batches=2 if device == "cuda" else 0)
            report["configs"].append(result)
            print(json.dumps(result), flush=True)
            _write(out_path, report)
    finally:
        shutil.rmtree(weights_dir, ignore_errors=True)
        report["total_s"] = round(time.perf_counter() - started, 1)
        _write(out_path, report)
    print(json.dumps({k: v for k, v in report.items() if k != "configs"}, indent=1))
    return 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (default size 640x480, fp32)")
    parser.add_argument("--small", action="store_true", help="tiny smoke run: small frames, small detector input, 1 batch")
    parser.add_argument("--pipeline", default="panama_moths_2024")
    parser.add_argument("--size", help="WIDTHxHEIGHT (default 4096x2160 on GPU, 640x480 on CPU)")
    parser.add_argument("--batch-sizes", help="comma separated (default 8,16 on GPU, 4 on CPU)")
    parser.add_argument("--precisions", help="comma separated of fp32,bf16,fp16 (default fp32,bf16 on GPU)")
    parser.add_argument("--moths", type=int, default=40, help="moths per frame; their size scales with the frame")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, help="timed batches per configuration (default 5 GPU, 3 CPU)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip remaining configurations after this long")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for gpu_bench.json (default $OUT)")
    parser.add_argument("--feed", action="store_true", help="fed pipeline: JPEG bytes decoded by threads (gpu_feed.json)")
    parser.add_argument("--threads", help="--feed: comma separated decode thread counts (default 8,16 on GPU)")
    parser.add_argument("--methods", help=f"--feed: comma separated of {','.join(FEED_METHODS)} (default all)")
    args = parser.parse_args()
    if args.feed:
        return main_feed(args, parser)

    started = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --cpu")
    width, height = map(int, (args.size or ("640x480" if args.cpu else "4096x2160")).lower().split("x"))
    if args.small:
        width, height = min(width, 320), min(height, 240)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("2" if args.small else "4" if args.cpu else "8,16")).split(",")]
    precisions = (args.precisions or ("fp32" if args.cpu else "fp32,bf16")).split(",")
    moths = 3 if args.small else args.moths
    batches = args.batches or (1 if args.small else 3 if args.cpu else 5)
    warmup = 1 if args.small else args.warmup

    pipeline = registry.get_pipeline(args.pipeline)
    if args.small:
        pipeline = dataclasses.replace(pipeline, detector=dataclasses.replace(pipeline.detector, min_size=160, max_size=224))
    weights_dir = Path(tempfile.mkdtemp(prefix="ami-bench-weights-"))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        "pipeline": pipeline.slug, "image_size": [width, height], "moths_per_frame": moths,
        "detector_input": [pipeline.detector.min_size, pipeline.detector.max_size],
        "method": "random weights of the real architectures; detector runs fully, its boxes are replaced by the "
                  "drawn moths'; the moth filter is biased so every crop reaches the species model",
        "configs": [],
    }
    out_path = Path(args.out) / "gpu_bench.json" if args.out else None
    try:
        t = time.perf_counter()
        write_weights(pipeline, weights_dir, species_classes=None if not args.small else 20)
        frames, boxes = synth_frames(max(batch_sizes) if not args.small else 2, width, height, moths)
        report["setup_s"] = round(time.perf_counter() - t, 1)
        print(f"setup {report['setup_s']}s: {len(frames)} frames {width}x{height}, {moths} moths each", flush=True)
        report["decode_ms_per_image"] = decode_costs(frames[0], device, max(batch_sizes))
        print("decode ms/image", json.dumps(report["decode_ms_per_image"]), flush=True)
        for precision in precisions:
            engine = engine_mod.Engine(weights_dir, device=device, precision=precision)
            models = {"detector": engine.load_detector(pipeline.detector),
                      "binary": engine.load_classifier(pipeline.binary) if pipeline.binary else None,
                      "classifier": engine.load_classifier(pipeline.classifier)}
            models["detector"].module = InjectBoxes(models["detector"].module)
            input_kinds = ["pil", "pinned"] if device == "cuda" and precision != "fp32" else ["pil"]
            for batch_size in batch_sizes:
                for inputs in input_kinds:
                    if time.perf_counter() - started > args.budget_s:
                        report.setdefault("skipped", []).append(f"{precision}/{batch_size}/{inputs}")
                        continue
                    result = bench_config(engine, models, frames, boxes, batch_size, inputs, warmup, batches,
                                          busy=device == "cuda")
                    report["configs"].append(result)
                    print(json.dumps(result), flush=True)
                    _write(out_path, report)
            del engine, models
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(weights_dir, ignore_errors=True)
        report["total_s"] = round(time.perf_counter() - started, 1)
        _write(out_path, report)
    print(json.dumps({k: v for k, v in report.items() if k != "configs"}, indent=1))
    return 0


def _write(path: Path | None, report: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
