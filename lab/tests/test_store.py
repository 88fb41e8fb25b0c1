"""The store's rules, without HTTP or NATS: first result wins, progress only grows, one completion."""

from __future__ import annotations

import threading

import pytest

from antenna_lab.antenna.store import Conflict, NewResult, Store
from antenna_flows.jetstream import ConsumerStats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store() -> Store:
    return Store(":memory:", clock=Clock())


def started(store: Store, n: int = 3, pipeline: str = "p", **kwargs) -> int:
    job, images = store.create_job(
        pipeline_slug=pipeline, images=[(None, f"http://x/{i}.jpg") for i in range(n)], ack_wait_s=30, max_deliver=2, **kwargs
    )
    store.start_job(job.id, {image.image_id: seq for seq, image in enumerate(images, start=1)})
    return job.id


def ok(image_id: str, delivered: int = 1) -> NewResult:
    return NewResult(image_id, "ok", '{"pipeline": "p"}', delivered)


def failed(image_id: str) -> NewResult:
    return NewResult(image_id, "error", '{"error": "bad", "image_id": null}', 1)


def test_create_assigns_global_image_ids_and_job_ids(store: Store) -> None:
    a, a_images = store.create_job(pipeline_slug="p", images=[(None, "u1"), (None, "u2")], ack_wait_s=1, max_deliver=2)
    b, b_images = store.create_job(
        pipeline_slug="p", images=[("10", "u3"), (None, "u4"), ("cam-7", "u5")], ack_wait_s=1, max_deliver=2, job_id=50
    )
    c, c_images = store.create_job(pipeline_slug="p", images=[(None, "u6"), ("1", "u1")], ack_wait_s=1, max_deliver=2)
    assert (a.id, b.id, c.id) == (1, 50, 51)
    assert [i.image_id for i in a_images] == ["1", "2"]
    assert [i.image_id for i in b_images] == ["10", "11", "cam-7"]  # past every given numeric id
    assert [i.image_id for i in c_images] == ["12", "1"]  # an image may belong to several jobs
    assert a.status == "CREATED" and a.total == 2 and a.started_at is None


def test_create_conflicts(store: Store) -> None:
    started(store, job_id=5)
    with pytest.raises(Conflict) as taken:
        started(store, job_id=5)
    assert taken.value.field == "id"
    with pytest.raises(Conflict) as repeated:
        store.create_job(pipeline_slug="p", images=[("a", "u"), ("a", "v")], ack_wait_s=1, max_deliver=2)
    assert repeated.value.field == "images"
    assert [j.id for j in store.list_jobs()[1]] == [5]


def test_start_records_stream_seqs(store: Store) -> None:
    job_id = started(store)
    job = store.job(job_id)
    assert job.status == "STARTED" and job.started_at > job.created_at
    assert store.images_by_seq(job_id, [1, 3, 99]) == {1: "1", 3: "3"}


def test_first_result_wins_and_later_ones_are_duplicates(store: Store) -> None:
    job_id = started(store)
    first = store.save_results(job_id, [failed("1"), ok("2")])
    again = store.save_results(job_id, [ok("1", delivered=2), ok("2"), ok("2")])
    assert first.stored == [True, True] and not first.completed
    assert again.stored == [False, False, False] and again.duplicates == 3
    results = {r.image_id: r for r in store.results(job_id)}
    assert (results["1"].kind, results["1"].duplicates, results["1"].num_delivered) == ("error", 1, 1)
    assert results["1"].payload == {"error": "bad", "image_id": None}
    assert results["2"].duplicates == 2 and results["2"].last_at > results["2"].first_at
    job = store.job(job_id)
    assert (job.results, job.errors, job.duplicates, job.status) == (1, 1, 3, "STARTED")


def test_the_last_first_result_completes_the_job_once(store: Store) -> None:
    job_id = started(store, 2)
    assert not store.save_results(job_id, [ok("1")]).completed
    first_result_at = store.job(job_id).first_result_at
    done = store.save_results(job_id, [ok("2"), ok("1")])
    assert done.completed and done.stored == [True, False]
    assert not store.save_results(job_id, [ok("2")]).completed  # a duplicate after completion
    job = store.job(job_id)
    assert job.status == "SUCCESS" and job.completed_at > first_result_at == job.first_result_at
    assert job.processed == job.total == 2


def test_dead_letters_fill_only_images_without_a_result(store: Store) -> None:
    job_id = started(store, 2)
    store.save_results(job_id, [ok("1")])
    outcome = store.record_dead_letters(job_id, ["1", "2"], "task exceeded max_deliver (2 deliveries) without a result")
    assert outcome.stored == [False, True] and outcome.completed
    job = store.job(job_id)
    assert (job.results, job.errors, job.duplicates, job.status, job.dead_lettered) == (1, 1, 0, "SUCCESS", 1)
    dead = [r for r in store.results(job_id) if r.image_id == "2"][0]
    assert dead.payload == {"error": "task exceeded max_deliver (2 deliveries) without a result", "image_id": "2"}
    assert dead.dead_lettered and store.dead_lettered(job_id) == 1
    assert not [r for r in store.results(job_id) if r.image_id == "1"][0].dead_lettered


def test_more_than_half_failed_is_failure(store: Store) -> None:
    half = started(store, 2)
    store.save_results(half, [failed("1"), ok("2")])
    assert store.job(half).status == "SUCCESS"  # exactly half: not more than half
    most = started(store, 3)
    images = [i.image_id for i in store.images(most)]
    outcome = store.save_results(most, [failed(images[0]), failed(images[1]), ok(images[2])])
    assert outcome.completed and store.job(most).status == "FAILURE"
    assert store.job(most).dead_lettered == 0  # a worker's error results are not dead letters


def test_job_states_pending_then_started(store: Store) -> None:
    job, images = store.create_job(pipeline_slug="p", images=[(None, "u")], ack_wait_s=1, max_deliver=2)
    store.mark_pending(job.id)
    assert store.job(job.id).status == "PENDING"
    assert store.list_jobs(incomplete_only=True)[0] == 1
    store.start_job(job.id, {images[0].image_id: 1})
    assert store.job(job.id).status == "STARTED"


def test_cancel_is_final_and_results_after_it_do_not_complete(store: Store) -> None:
    job_id = started(store, 1)
    assert store.cancel_job(job_id)
    assert not store.cancel_job(job_id)
    assert not store.save_results(job_id, [ok("1")]).completed
    job = store.job(job_id)
    assert job.status == "CANCELING" and job.completed_at is None and job.cancelled_at is not None
    assert job.results == 1
    assert store.uncleaned_job_ids() == [job_id]
    store.mark_cleaned(job_id)  # NATS resources gone: REVOKED
    assert store.uncleaned_job_ids() == [] and store.job(job_id).status == "REVOKED"
    assert not store.cancel_job(job_id)
    never_started, _ = store.create_job(pipeline_slug="p", images=[(None, "u")], ack_wait_s=1, max_deliver=2)
    assert store.cancel_job(never_started.id) and store.job(never_started.id).status == "REVOKED"


def test_stats_samples_keep_cumulative_counts_and_freeze_after_cleanup(store: Store) -> None:
    job_id = started(store, 2)

    def sample(deliveries: int, redelivered: int) -> ConsumerStats:
        return ConsumerStats(job_id, 2, 0, redelivered, redelivered, 2, deliveries, 30.0, 2)

    store.set_stats(job_id, sample(deliveries=4, redelivered=1))
    store.set_stats(job_id, sample(deliveries=3, redelivered=0))  # an out-of-order sample
    job = store.job(job_id)
    assert (job.deliveries, job.redeliveries, job.redelivered) == (4, 2, 0)
    store.mark_cleaned(job_id)
    store.set_stats(job_id, sample(deliveries=9, redelivered=5))
    assert store.job(job_id).deliveries == 4


def test_listing_filters_and_orders(store: Store) -> None:
    a = started(store, 1)
    b = started(store, 1, pipeline="q")
    store.cancel_job(a)
    assert [j.id for j in store.list_jobs()[1]] == [b, a]
    assert [j.id for j in store.list_jobs(order="oldest")[1]] == [a, b]
    assert store.list_jobs(incomplete_only=True)[0] == 2  # CANCELING is not final (Antenna's JobState)
    store.mark_cleaned(a)
    count, page = store.list_jobs(incomplete_only=True)
    assert count == 1 and [j.id for j in page] == [b]
    assert store.list_jobs(pipelines=["other"])[0] == 0
    assert [j.id for j in store.list_jobs(pipelines=["q", "other"])[1]] == [b]
    assert store.list_jobs(dispatch_mode="async_api", limit=1, offset=1)[1][0].id == a
    assert store.active_job_ids() == [b]


def test_pipeline_registration_upserts(store: Store) -> None:
    p = {"name": "P", "slug": "p", "version": 1}
    assert store.register_pipelines(1, "svc", [p]) == (["p"], [], 1)
    assert store.register_pipelines(1, "svc", [{**p, "version": 2}, {**p, "slug": "q"}]) == (["q"], ["p"], 1)
    assert store.register_pipelines(2, "svc", [p])[2] == 2  # services are per project
    assert [x["version"] for x in store.pipelines(1)] == [2, 1]


def test_registered_algorithms_are_a_union_per_project_and_pipeline(store: Store) -> None:
    ami = {"name": "P", "slug": "p", "version": 1, "algorithms": [{"name": "Det", "key": "det"}, {"name": "Cls", "key": "cls"}]}
    sim = {"name": "P", "slug": "p", "version": 1, "algorithms": [{"name": "Sim", "key": "sim-detector"}]}
    first = store.register(1, "ami-service", [ami])
    assert (first.pipelines_created, first.algorithms_created) == (["p"], ["det", "cls"])
    second = store.register(1, "sim-service", [sim])
    assert (second.pipelines_updated, second.algorithms_created) == (["p"], ["sim-detector"])
    assert store.algorithm_keys(1, "p") == {"det", "cls", "sim-detector"}
    assert store.register(2, "ami-service", [ami]).algorithms_created == []  # algorithms are global, by key
    assert store.algorithm_keys(2, "p") == {"det", "cls"} and store.algorithm_keys(3, "p") == set()


def test_concurrent_saves_from_threads_count_exactly(tmp_path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    job_id = started(store, 1)
    barrier = threading.Barrier(8)

    def post() -> None:
        barrier.wait()
        for _ in range(25):
            store.save_results(job_id, [ok("1")])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job = store.job(job_id)
    assert (job.results, job.duplicates, job.status) == (1, 199, "SUCCESS")
    store.close()
    assert Store(tmp_path / "db.sqlite3").job(job_id).duplicates == 199  # on disk


def test_unstart_and_corrected_stream_seqs(store: Store) -> None:
    job_id = started(store, 2)
    store.record_stream_seqs(job_id, {"1": 2, "2": 1})  # a swap must not trip the (job, seq) uniqueness
    assert store.images_by_seq(job_id, [1, 2]) == {1: "2", 2: "1"}
    store.unstart_job(job_id)
    job = store.job(job_id)
    assert (job.status, job.started_at) == ("CREATED", None)
    assert store.images_by_seq(job_id, [1, 2]) == {}
    store.discard_job(job_id)
    assert store.job(job_id) is None and store.images(job_id) == []
