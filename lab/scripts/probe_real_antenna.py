"""What the real Antenna charges per request and per save, measured on this machine.

The numbers behind a scenario's ``antenna`` section (``shared/bench/README.md``): each endpoint
timed alone (one request at a time, nothing else running), and the save rate of Antenna's Celery
queue with a burst of results. Needs the real-Antenna harness (``shared/real-antenna/``), set up.

Run (from the checkout; the harness's env, the project's venv):

    NATS_TASK_TTR=30 lab/scripts/probe-real-antenna.sh [--out bench-out/real-antenna/probe.json]

Two modes in one file: the default (project venv: HTTP timings with httpx) and ``--make-job N``
(Antenna's venv, called by the default mode: a job of N images created and enqueued through
Antenna's own path, as ``run_mix.py`` does; prints its id).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HARNESS = Path(os.environ.get("RA_HARNESS", "/work/shared/real-antenna"))
SLUG = "quebec_vermont_moths_2023"


def make_job(n: int) -> None:
    """(Antenna's venv) A sim job of ``n`` images on ``SLUG``, enqueued; prints ``job_id``."""
    sys.path.insert(0, str(HARNESS))
    import run_job as rj  # noqa: PLC0415 - sets up Django

    from ami.jobs.models import Job, JobDispatchMode  # noqa: PLC0415
    from ami.main.models import Project  # noqa: PLC0415
    from ami.ml.models import Pipeline  # noqa: PLC0415

    project = Project.objects.get(pk=rj.PROJECT_ID)
    names = rj.ensure_images(n, 640, 480)
    reg = rj.register(SLUG, "sim")
    if not reg.get("ok"):
        raise SystemExit(f"registration failed: {reg}")
    pipeline = Pipeline.objects.get(slug=rj.served_slug(SLUG, "sim"))
    dep = rj.make_deployment(project, names[:n], f"probe{time.strftime('%H%M%S')}-{n}")
    job = Job.objects.create(name=f"probe {n}", project=project, pipeline=pipeline, deployment=dep,
                             job_type_key="ml", dispatch_mode=JobDispatchMode.ASYNC_API)
    job.enqueue()
    print(json.dumps({"job_id": job.pk, "pipeline": pipeline.slug}))


def cancel_jobs() -> None:
    sys.path.insert(0, str(HARNESS))
    import run_job as rj  # noqa: PLC0415

    from ami.main.models import Project  # noqa: PLC0415

    rj.cancel_stale_jobs(Project.objects.get(pk=rj.PROJECT_ID))


# --- the timings (project venv) ----------------------------------------------------------------


def _antenna_python(*args: str) -> str:
    py = Path(os.environ["ANTENNA_SRC"]) / ".venv" / "bin" / "python"
    out = subprocess.run([str(py), __file__, *args], check=True, capture_output=True, text=True, cwd="/tmp")
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def _result(task: dict, pipeline: str) -> dict:
    """What the sim model answers for one task (one detection, one classification)."""
    now = datetime.now(timezone.utc).isoformat()
    det = {"name": "Simulated detector", "key": "sim-detector"}
    cls = {"name": "Simulated classifier", "key": "sim-classifier"}
    return {
        "reply_subject": task["reply_subject"],
        "result": {
            "pipeline": pipeline, "algorithms": {}, "total_time": 0.25,
            "source_images": [{"id": task["image_id"], "url": task["image_url"]}],
            "detections": [{
                "source_image_id": task["image_id"], "bbox": {"x1": 160, "y1": 120, "x2": 320, "y2": 240},
                "inference_time": 0.25, "algorithm": det, "timestamp": now,
                "classifications": [{"classification": "Simulated moth", "labels": None, "scores": [0.9],
                                     "logits": [2.2], "inference_time": 0.25, "algorithm": cls, "terminal": True,
                                     "timestamp": now}],
            }],
        },
    }


def _timed(client, method: str, url: str, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    r = client.request(method, url, **kw)
    dt = time.perf_counter() - t
    r.raise_for_status()
    return dt, r.json()


def _summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "median_s": round(statistics.median(xs), 4), "mean_s": round(statistics.fmean(xs), 4),
            "min_s": round(xs[0], 4), "max_s": round(xs[-1], 4)}


def _wait_stream(job_id: int, n: int, timeout: float = 120.0) -> None:
    import asyncio  # noqa: PLC0415

    import nats  # noqa: PLC0415

    async def count() -> int:
        nc = await nats.connect(os.environ["NATS_URL"])
        try:
            return (await nc.jetstream().stream_info(f"job_{job_id}")).state.messages
        except Exception:  # noqa: BLE001 - not there yet
            return 0
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while asyncio.run(count()) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id}: tasks not published within {timeout}s")
        time.sleep(1)


def _saved(client, job_id: int, total: int) -> int:
    """Images of the job whose results Antenna saved: its ``results`` stage's progress times the total
    (Antenna's Redis set of pending images; ``captures`` counts the same, but may drift under races)."""
    job = client.get(f"jobs/{job_id}/").json()
    for stage in job.get("progress", {}).get("stages", []):
        if stage.get("key") == "results":
            return round(float(stage.get("progress") or 0.0) * total)
    return 0


def probe(out: Path | None, repeat: int) -> dict:
    import httpx  # noqa: PLC0415

    api = f"http://127.0.0.1:{os.environ.get('ANTENNA_PORT', '8010')}/api/v2/"
    token = (Path(os.environ["RA_HOME"]) / "token").read_text().strip()
    headers = {"Authorization": f"Token {token}", "User-Agent": "antenna-flows/probe"}
    big = json.loads(_antenna_python("--make-job", "400"))
    small = json.loads(_antenna_python("--make-job", "2"))
    pipeline = big["pipeline"]
    _wait_stream(big["job_id"], 400)
    _wait_stream(small["job_id"], 2)
    report: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": os.getloadavg(),
                    "pipeline": pipeline, "jobs": [big["job_id"], small["job_id"]]}
    jid = big["job_id"]
    with httpx.Client(base_url=api, headers=headers, timeout=60) as c:
        list_params = {"ids_only": 1, "incomplete_only": 1, "dispatch_mode": "async_api", "pipeline__slug__in": pipeline}
        report["jobs_list"] = _summary([_timed(c, "GET", "jobs/", params=list_params)[0] for _ in range(repeat)])
        held: list[dict] = []
        for size in (1, 8, 24):
            times = []
            for _ in range(repeat if size == 1 else max(3, repeat // 4)):
                dt, body = _timed(c, "POST", f"jobs/{jid}/tasks/", json={"batch_size": size})
                assert len(body["tasks"]) == size, body  # a full queue: no fetch wait
                held += body["tasks"]
                times.append(dt)
            report[f"tasks_full_{size}"] = _summary(times)
        sid = small["job_id"]
        _timed(c, "POST", f"jobs/{sid}/tasks/", json={"batch_size": 2})  # the small job's queue is now empty
        report["tasks_empty_1"] = _summary([_timed(c, "POST", f"jobs/{sid}/tasks/", json={"batch_size": 1})[0]
                                            for _ in range(max(3, repeat // 2))])
        for size in (1, 24):
            times = []
            for _ in range(repeat if size == 1 else max(3, repeat // 4)):
                batch, held = held[:size], held[size:]
                dt, _ = _timed(c, "POST", f"jobs/{jid}/result/", json={"results": [_result(t, pipeline) for t in batch]})
                times.append(dt)
            report[f"result_{size}"] = _summary(times)
        # save rate: wait until everything posted so far is saved, then a burst of 120 results
        posted = repeat + 24 * max(3, repeat // 4)
        deadline = time.monotonic() + 300
        while _saved(c, jid, 400) < posted and time.monotonic() < deadline:
            time.sleep(0.5)
        base = _saved(c, jid, 400)
        burst = []
        while len(burst) < 120:
            _, body = _timed(c, "POST", f"jobs/{jid}/tasks/", json={"batch_size": 24})
            burst += body["tasks"]
        burst = burst[:120]
        t0 = time.perf_counter()
        for k in range(0, 120, 24):
            _timed(c, "POST", f"jobs/{jid}/result/", json={"results": [_result(t, pipeline) for t in burst[k:k + 24]]})
        samples = []
        while time.perf_counter() - t0 < 300:
            n = _saved(c, jid, 400) - base
            samples.append((round(time.perf_counter() - t0, 2), n))
            if n >= 120:
                break
            time.sleep(0.5)
        took = samples[-1][0]
        report["save_burst"] = {"results": 120, "saved": samples[-1][1], "seconds": took,
                                "saves_per_s": round(samples[-1][1] / took, 3) if took else None,
                                "samples": samples}
    report["load_after"] = os.getloadavg()
    _antenna_python("--cancel")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-job", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cancel", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    ap.add_argument("--repeat", type=int, default=20, help="requests per single-request timing")
    a = ap.parse_args()
    if a.make_job:
        make_job(a.make_job)
        return 0
    if a.cancel:
        cancel_jobs()
        return 0
    report = probe(a.out, a.repeat)
    print(json.dumps({k: v for k, v in report.items() if k != "save_burst"} | {
        "save_burst": {k: v for k, v in report["save_burst"].items() if k != "samples"}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
