"""Summarize real-Antenna mix reports (run_mix.py JSON) per variant: the figures issue 17 asks for.

    python bench-out/real-antenna/summarize.py bench-out/real-antenna/sitting-*/mix-*.json

Per run and as medians per variant: all jobs done (s after the first enqueue), the 10-image jobs'
completion after their own enqueue (Antenna's job SUCCESS: every answer saved), NATS redeliveries
(each job's consumer num_redelivered, sampled every 2 s by the harness, maximum, summed over jobs),
requests per image by endpoint, duplicate detection rows, lost images.
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
    small = sorted(j["done_after_enqueue_s"] for j in jobs if j["images"] <= 10)
    http = d.get("http", {})
    images = sum(j["images"] for j in jobs)
    count = lambda key: sum(v for k, v in http.items() if key in k)  # noqa: E731
    return {
        "file": path.rsplit("/", 1)[-1], "variant": f"{strategy}/{transport}",
        "done_s": d["elapsed_s"], "small_s": small,
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
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        worst_small = statistics.median(max(r["small_s"]) for r in rs)
        print(f"  {variant:11} runs {len(rs)}: all done {med('done_s'):.1f} s, worst 10-image job {worst_small:.1f} s, "
              f"redeliveries {med('redeliveries'):.0f}, requests/image {med('req_per_image'):.3f} "
              f"(jobs {med('jobs_per_image'):.3f}, tasks {med('tasks_per_image'):.3f}, result {med('result_per_image'):.3f}), "
              f"duplicates {sum(r['duplicates'] for r in rs)}, lost {sum(r['lost'] for r in rs)}")


if __name__ == "__main__":
    main(sys.argv[1:])
