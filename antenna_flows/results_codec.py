"""Results to JSON without a Python object per float.

A species classifier's result holds the full softmax ``scores`` and ``logits`` of every crop:
29,176 classes for ``global_moths_2024``, so a batch of 16 trap images with 40 moths each is
~37 million floats. Turned into Python floats (``tensor.tolist()``) and written by pydantic,
that costs the inference thread many times the GPU time of the batch.

The fast path: the model reads each stage's outputs back once per batch as a float32 array and
puts a row of it (a view, no copy) into each :class:`~antenna_flows.schemas.ClassificationResponse`
(``scores``/``logits`` are :data:`~antenna_flows.schemas.FloatList`, which accepts arrays);
:func:`dumps` then lets pydantic lay out every object (so the schema stays the one contract)
with the arrays left as they are, and orjson writes them straight from their buffers.

The JSON is what pydantic's ``model_dump_json`` writes, field for field and key for key,
except that a float32 is written in its own shortest form (``0.1`` rather than
``0.10000000149011612``): the same float32 once read back, and about half the bytes.
Antenna reads it with its pydantic schema like any other result (tests validate it).

Measured on the shared 2-core development VM (``python tests/test_results_codec.py``): one batch
of 16 images x 40 detections x 29,176 classes took 14.5 s from the stage outputs to the POST
body the old way (762 MB of JSON) and 1.0 s now (450 MB), nearly all of it orjson formatting
floats. orjson holds the GIL while it writes, so on the event loop use :func:`dumps_async`, which
writes one result at a time and lets other tasks run in between.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from pydantic import BaseModel

OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS


def _fallback(value: Any) -> Any:
    """What orjson cannot write itself: arrays it refuses (not C-contiguous, float16...), numpy
    and torch scalars, and anything else with ``tolist()``."""
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python")
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def to_jsonable(model: BaseModel | Any) -> Any:
    """``model`` as plain Python containers, with arrays left as arrays (no copy)."""
    return model.model_dump(mode="python") if isinstance(model, BaseModel) else model


def dumps(model: BaseModel | Any) -> bytes:
    """``model`` (e.g. a :class:`~antenna_flows.schemas.ResultsRequest`) as JSON bytes, the
    float arrays in it written by orjson without a Python float each."""
    return orjson.dumps(to_jsonable(model), default=_fallback, option=OPTIONS)


async def dumps_async(model: BaseModel | Any, field: str = "results") -> bytes:
    """:func:`dumps`, byte for byte, written one element of ``model.<field>`` at a time with the
    event loop free in between: a big batch stalls other tasks (heartbeats, downloads) for one
    image's result (~60 ms for the global model), not for the whole body."""
    data = to_jsonable(model)
    if not isinstance(data, dict) or not isinstance(data.get(field), list) or len(data[field]) < 2:
        return dumps(data)
    parts = []
    for key, value in data.items():
        if key != field:
            parts.append(orjson.dumps(key) + b":" + orjson.dumps(value, default=_fallback, option=OPTIONS))
            continue
        items = []
        for item in value:
            items.append(orjson.dumps(item, default=_fallback, option=OPTIONS))
            await asyncio.sleep(0)
        parts.append(orjson.dumps(key) + b":[" + b",".join(items) + b"]")
    return b"{" + b",".join(parts) + b"}"
