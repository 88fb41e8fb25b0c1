"""Summarize real-Antenna mix reports (run_mix.py JSON) per variant: the figures issue 17 asks for.

    python bench-out/real-antenna/summarize.py bench-out/real-antenna/sitting-*/mix-*.json

Per run and as medians per variant: all jobs done (s after the first enqueue), the 10-image jobs'
completion after their own enqueue (Antenna's job SUCCESS: every answer saved), NATS redeliveries
(each job's consumer num_redelivered, sampled every 2 s by the harness, maximum, summed over jobs),
requests per image by endpoint, duplicate detection rows, lost images.

Antenna's job-status race: two Celery processes saving a job's last two results at once can leave
the job STARTED with every result saved and its results stage SUCCESS (celery.log: the last
progress update reads a stale "processed=49/50"); the harness then waits 120 s and says "stalled".
Such a run is marked ``race``: its done time is the latest done time of the other jobs (the stuck
job's last save, read from celery.log, was within 2 s of it or earlier in the runs seen so far),
and its requests per image are not comparable (the fleet polls the stuck job for 120 s more).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def row(path: str) -> dict:
    d = json.load(open(path))
    strategy, transport = d["variant"].split("/")[1:3]
    jobs = d["jobs"]
    small = sorted(j["done_after_enqueue_s"] for j in jobs if j["images"] <= 10 and j["done_after_enqueue_s"] is not None)
    http = d.get("http", {})
    images = sum(j["images"] for j in jobs)
    count = lambda key: sum(v for k, v in http.items() if key in k)  # noqa: E731
    raced = [j for j in jobs if j["done_after_enqueue_s"] is None and j["images_with_results"] == j["images"]
             and (j.get("results_stage") or {}).get("status") == "SUCCESS"]
    done_s = d["elapsed_s"]
    if d["stop_reason"] != "all final" and raced and len(raced) < len(jobs):
        done_s = max(j["enqueued_s"] + j["done_after_enqueue_s"] for j in jobs if j not in raced)
    return {
        "file": path.rsplit("/", 1)[-1] + (" (race)" if raced else ""), "variant": f"{strategy}/{transport}",
        "done_s": done_s, "small_s": small, "race": bool(raced),
        "redeliveries": sum(j.get("max_redelivered") or 0 for j in jobs),
        "req_per_image": d["requests_per_image"],
        "jobs_per_image": round(count("list/") / images, 3), "tasks_per_image": round(count("tasks/") / images, 3),
        "result_per_image": round(count("result/") / images, 3),
        "duplicates": d["duplicate_detections"], "lost": d["lost"], "status": d["stop_reason"],
    }


def main(paths: list[str]) -> None:
    rows = [row(p) for p in sorted(paths)]
    by: dict[str, list[dict]] = defaultdict(list)
    print(f"{'run':38} {'variant':11} {'done_s':>7} {'10-img jobs (s)':>16} {'redeliv':>7} {'req/img':>7} "
          f"{'(jobs, tasks, result)':>22} {'dups':>4} {'lost':>4}")
    for r in rows:
        by[r["variant"]].append(r)
        print(f"{r['file']:38} {r['variant']:11} {r['done_s']:7.1f} {', '.join(f'{s:.1f}' for s in r['small_s']):>16} "
              f"{r['redeliveries']:7d} {r['req_per_image']:7.3f} "
              f"{'({}, {}, {})'.format(r['jobs_per_image'], r['tasks_per_image'], r['result_per_image']):>22} "
              f"{r['duplicates']:4d} {r['lost']:4d}")
    print("\nmedians")
    for variant, rs in sorted(by.items()):
        clean = [r for r in rs if not r["race"]] or rs  # requests per image: runs without the race's 120 s of polls

        def med(k: str) -> float:
            return statistics.median(r[k] for r in (clean if k.endswith("per_image") else rs))

        worst_small = statistics.median(max(r["small_s"]) for r in rs)
        print(f"  {variant:11} runs {len(rs)}: all done {med('done_s'):.1f} s, worst 10-image job {worst_small:.1f} s, "
              f"redeliveries {med('redeliveries'):.0f}, requests/image {med('req_per_image'):.3f} "
              f"(jobs {med('jobs_per_image'):.3f}, tasks {med('tasks_per_image'):.3f}, result {med('result_per_image'):.3f}), "
              f"duplicates {sum(r['duplicates'] for r in rs)}, lost {sum(r['lost'] for r in rs)}")


if __name__ == "__main__":
    main(sys.argv[1:])
