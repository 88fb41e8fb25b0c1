"""results_codec: results with float32 arrays in them, written as JSON without a Python float
per value, equal (as parsed JSON, to float32 rounding) to what pydantic writes the slow way and
valid against Antenna's schemas.

Run as a script for the full-size measurement (16 images x 40 detections x 29,176 classes):
``python tests/test_results_codec.py [--classes 29176]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
import torch

from antenna_flows import results_codec
from antenna_flows.antenna_client import AntennaClient
from antenna_flows.models.ami import _classifications
from antenna_flows.models.engine import StageOutput
from antenna_flows.schemas import (
    AlgorithmReference,
    BoundingBox,
    ClassificationResponse,
    DetectionResponse,
    PipelineResultsError,
    PipelineResultsResponse,
    ResultsRequest,
    SourceImageResponse,
    TaskResult,
)

from tests.helpers import QuietHTTPServer

GLOBAL_CLASSES = 29_176  # global_moths_2024
BINARY = AlgorithmReference(name="Moth / non-moth", key="moth_nonmoth_classifier")
SPECIES = AlgorithmReference(name="Global species", key="global_moths_2024")
DETECTOR = AlgorithmReference(name="FasterRCNN", key="fasterrcnn_for_ami_moth_traps_2023")


def _stage(n: int, classes: int, seed: int) -> StageOutput:
    """What Engine.classify returns: (n, classes) float32 CPU logits and softmax scores."""
    logits = torch.from_numpy(np.random.default_rng(seed).normal(0, 3, (n, classes)).astype(np.float32))
    both = torch.stack((logits, torch.softmax(logits, 1)))
    return StageOutput(both[0], both[1])


def _labels(classes: int) -> list[str]:
    return [f"Species {i}" for i in range(classes)]


def stages(n: int, classes: int, seed: int = 0) -> tuple[StageOutput, StageOutput]:
    return _stage(n, 2, seed), _stage(n, classes, seed + 1)


def batch(images: int, detections: int, classes: int, *, as_lists: bool = False, seed: int = 0,
          outputs: tuple[StageOutput, StageOutput] | None = None) -> ResultsRequest:
    """A result POST for ``images`` x ``detections`` moths: each detection with the moth filter's
    and the species classifier's classification, built as AmiModel builds them (the stage's
    arrays once per batch; ``as_lists``: the way it used to, ``tensor.tolist()`` per stage)."""
    binary, species = outputs or stages(images * detections, classes, seed)
    if as_lists:
        per_stage = [_classifications_as_lists(s, _labels(s.scores.shape[1]), ref, terminal)
                     for s, ref, terminal in ((binary, BINARY, False), (species, SPECIES, True))]
    else:
        per_stage = [_classifications(binary, ["moth", "nonmoth"], BINARY, False, 0.001),
                     _classifications(species, _labels(classes), SPECIES, True, 0.002)]
    now = dt.datetime(2026, 11, 29, 5, 0, 0, 123456, tzinfo=dt.timezone.utc)
    results = []
    for i in range(images):
        rows = range(i * detections, (i + 1) * detections)
        dets = [DetectionResponse.model_construct(
            source_image_id=str(i), bbox=BoundingBox(x1=r, y1=2.0, x2=r + 30.0, y2=40.0), inference_time=0.01,
            algorithm=DETECTOR, timestamp=now, crop_image_url=None,
            classifications=[per_stage[0][r], per_stage[1][r]]) for r in rows]
        result = PipelineResultsResponse(pipeline="global_moths_2024", algorithms={}, total_time=0.5,
                                         source_images=[SourceImageResponse(id=str(i), url=f"http://x/{i}.jpg")],
                                         detections=dets, errors=None)
        results.append(TaskResult(reply_subject=f"$JS.ACK.job_1.c.1.{i}.{i}.0.0", result=result))
    results.append(TaskResult(reply_subject="$JS.ACK.job_1.c.1.99.99.0.0",
                              result=PipelineResultsError(error="image download failed: HTTP 404", image_id="99")))
    return ResultsRequest(results=results, client_info={"worker": "test", "version": "0"})


def _classifications_as_lists(stage: StageOutput, labels: list[str], algorithm: AlgorithmReference,
                              terminal: bool) -> list[ClassificationResponse]:
    """The previous AmiModel: a Python float per score and logit."""
    best = stage.scores.argmax(1).tolist()
    return [ClassificationResponse.model_construct(
        classification=labels[b], labels=None, scores=s, logits=l, inference_time=0.001,
        algorithm=algorithm, terminal=terminal, timestamp=dt.datetime.now(dt.timezone.utc))
        for b, s, l in zip(best, stage.scores.tolist(), stage.logits.tolist())]


def assert_same_json(fast: object, slow: object, path: str = "$") -> None:
    """Equal trees; floats equal once rounded to float32 (the fast path writes float32s in their
    own shortest form, pydantic writes the same values as float64)."""
    if isinstance(slow, dict):
        assert isinstance(fast, dict) and list(fast) == list(slow), path  # same keys, same order
        for k in slow:
            assert_same_json(fast[k], slow[k], f"{path}.{k}")
    elif isinstance(slow, list):
        assert isinstance(fast, list) and len(fast) == len(slow), path
        if slow and all(isinstance(v, float) for v in slow[:8]):
            assert np.array_equal(np.asarray(fast, np.float32), np.asarray(slow, np.float32)), path
        else:
            for i, (f, s) in enumerate(zip(fast, slow)):
                assert_same_json(f, s, f"{path}[{i}]")
    elif isinstance(slow, float):
        assert isinstance(fast, (int, float)) and (fast == slow or math.isclose(fast, slow, rel_tol=1e-7)), path
    else:
        assert fast == slow, path


def test_fast_json_equals_pydantic_json_and_validates():
    body = batch(images=3, detections=4, classes=50)
    fast, slow = results_codec.dumps(body), body.model_dump_json().encode()
    assert_same_json(json.loads(fast), json.loads(slow))
    again = ResultsRequest.model_validate_json(fast)  # Antenna's schema reads it as any result
    first = again.results[0].result
    assert isinstance(first, PipelineResultsResponse) and isinstance(again.results[-1].result, PipelineResultsError)
    species = first.detections[0].classifications[1]
    assert isinstance(species.scores, list) and len(species.scores) == len(species.logits) == 50
    assert first.detections[0].timestamp == dt.datetime(2026, 11, 29, 5, 0, 0, 123456, tzinfo=dt.timezone.utc)
    assert len(fast) < 0.75 * len(slow)  # float32s in their shortest form


async def test_dumps_async_writes_the_same_bytes():
    body = batch(images=3, detections=2, classes=30)
    assert await results_codec.dumps_async(body) == results_codec.dumps(body)
    single = ResultsRequest(results=body.results[:1])
    assert await results_codec.dumps_async(single) == results_codec.dumps(single)
    empty = ResultsRequest(results=[], client_info=None)
    assert await results_codec.dumps_async(empty) == results_codec.dumps(empty) == b'{"results":[],"client_info":null}'


def test_rows_are_views_of_one_array_per_stage():
    body = batch(images=2, detections=3, classes=20)
    rows = [d.classifications[1].scores for r in body.results[:2] for d in r.result.detections]
    assert all(isinstance(r, np.ndarray) and r.dtype == np.float32 and r.flags.c_contiguous for r in rows)
    assert len({id(r.base) for r in rows}) == 1, "one array per stage per batch, not one per crop"
    assert sum(rows[0]) == pytest.approx(1.0, abs=1e-5) and len(rows[0]) == 20


def test_lists_and_odd_arrays_still_serialise():
    """The sim model's plain lists, non-contiguous or float16/float64 arrays, NaN (null, as pydantic)."""
    c = ClassificationResponse(classification="moth", scores=[0.9, 0.1], algorithm=BINARY, timestamp=dt.datetime.now(dt.timezone.utc))
    assert_same_json(json.loads(results_codec.dumps(c)), json.loads(c.model_dump_json()))
    grid = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    for array in (grid[:, 1], grid.astype(np.float16)[0], grid.astype(np.float64)[1], np.array([np.nan, 1.0], np.float32)):
        c = ClassificationResponse.model_construct(classification="x", labels=None, scores=array, logits=None,
                                                   inference_time=None, algorithm=BINARY, terminal=True,
                                                   timestamp=dt.datetime.now(dt.timezone.utc))
        assert_same_json(json.loads(results_codec.dumps(c)), json.loads(c.model_dump_json()))


async def test_post_results_sends_the_fast_json_to_antenna():
    """AntennaClient.post_results over real HTTP (127.0.0.1): the body it sends is the codec's,
    and Antenna's schema reads it."""
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            answer = json.dumps({"status": "accepted", "job_id": 7, "results_queued": 0, "tasks": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    client = AntennaClient(f"http://127.0.0.1:{httpd.server_address[1]}/api/v2", "token")
    try:
        body = batch(images=2, detections=3, classes=40)
        answer = await client.post_results(7, body.results)
    finally:
        await client.aclose()
        httpd.shutdown()
        httpd.server_close()
    assert answer.job_id == 7
    [sent] = received
    parsed = ResultsRequest.model_validate_json(sent)
    assert len(parsed.results) == 3 and parsed.client_info is not None
    slow = ResultsRequest(results=body.results, client_info=parsed.client_info).model_dump_json()
    assert_same_json(json.loads(sent), json.loads(slow))


def measure(images: int = 16, detections: int = 40, classes: int = GLOBAL_CLASSES, repeat: int = 1) -> dict[str, float]:
    """Seconds from one batch's stage outputs (CPU tensors) to the POST body's JSON bytes, the old
    way (tolist per stage, lists in the results, pydantic's model_dump_json) and the new (row views
    in the results, results_codec.dumps)."""
    def timed(fn):
        best = math.inf
        for _ in range(repeat):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    outputs = stages(images * detections, classes)  # the model's work: not timed
    before, slow = timed(lambda: batch(images, detections, classes, as_lists=True, outputs=outputs).model_dump_json())
    after, fast = timed(lambda: results_codec.dumps(batch(images, detections, classes, outputs=outputs)))
    return {"before_s": before, "after_s": after, "speedup": before / after,
            "before_mb": len(slow) / 1e6, "after_mb": len(fast) / 1e6}


def test_serialising_a_batch_is_much_cheaper_than_before():
    """A tenth of the global model's classes keeps this quick on a shared CPU; the full size is
    measured by running this file as a script (figures in the module docstring's command)."""
    m = measure(images=16, detections=40, classes=GLOBAL_CLASSES // 10)
    print(f"16 images x 40 detections x {GLOBAL_CLASSES // 10} classes: before {m['before_s']:.3f} s "
          f"({m['before_mb']:.0f} MB), after {m['after_s']:.3f} s ({m['after_mb']:.0f} MB), {m['speedup']:.1f}x")
    assert m["speedup"] > 2.5  # 5-14x measured; a loose bound, the CPU is shared


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--detections", type=int, default=40)
    parser.add_argument("--classes", type=int, default=GLOBAL_CLASSES)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(measure(args.images, args.detections, args.classes, args.repeat), indent=1))
