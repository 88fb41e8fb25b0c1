"""The local Antenna's database: jobs, their images, results and pipeline registrations.

SQLite (stdlib, WAL) on one connection guarded by a lock: every call is a
sub-millisecond transaction, so the API's event loop may call it directly and
tests, the bench and the CLI may read it from other threads.

The rules Antenna's own result handling follows live here, free of HTTP and
NATS:

- a result is saved once per (job, image): the first one wins, success or
  error; later ones only increment that image's ``duplicates`` counter;
- progress counters only ever grow, and a job leaves an active state once;
- a job whose every image has a result or an error result becomes SUCCESS in
  the same transaction as that last result (so exactly one caller sees the
  transition and cleans up the job's NATS resources), or FAILURE when more
  than half its images failed (Antenna's ``FAILURE_THRESHOLD``);
- a cancelled job is CANCELING until its NATS resources are gone, then REVOKED;
- an error result made by the dead-letter reaper is marked ``dead_lettered``
  (work never done, counted apart from a worker's deliberate error results);
- pipeline registrations add algorithms (a union per project and slug), and
  results are checked against them at save time (:meth:`Store.algorithm_keys`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from antenna_lab.antenna.models import (
    ACTIVE_STATES,
    CANCELING,
    CREATED,
    FAILURE,
    FINAL_STATES,
    PENDING,
    REVOKED,
    STARTED,
    SUCCESS,
    Job,
)
from antenna_flows.jetstream import ConsumerStats

ResultKind = Literal["ok", "error"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    project_id INTEGER NOT NULL,
    pipeline_slug TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    dispatch_mode TEXT NOT NULL,
    ack_wait_s REAL NOT NULL,
    max_deliver INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    first_result_at REAL,
    last_result_at REAL,
    completed_at REAL,
    cancelled_at REAL,
    total INTEGER NOT NULL,
    results INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    -- consumer stats: sampled while active, snapshot taken before NATS cleanup
    messages INTEGER NOT NULL DEFAULT 0,
    pending INTEGER NOT NULL DEFAULT 0,
    ack_pending INTEGER NOT NULL DEFAULT 0,
    redelivered INTEGER NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0,
    redeliveries INTEGER NOT NULL DEFAULT 0,
    stats_at REAL,
    nats_cleaned INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS images (
    job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    image_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    url TEXT NOT NULL,
    stream_seq INTEGER,
    PRIMARY KEY (job_id, image_id),
    UNIQUE (job_id, stream_seq)
);
CREATE TABLE IF NOT EXISTS results (
    job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    image_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('ok', 'error')),
    payload TEXT NOT NULL,
    first_at REAL NOT NULL,
    num_delivered INTEGER,
    duplicates INTEGER NOT NULL DEFAULT 0,
    last_at REAL NOT NULL,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, image_id)
);
CREATE TABLE IF NOT EXISTS processing_services (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    last_seen_at REAL NOT NULL,
    created_at REAL,
    UNIQUE (project_id, name)
);
CREATE TABLE IF NOT EXISTS pipelines (
    project_id INTEGER NOT NULL,
    slug TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    config TEXT NOT NULL,
    processing_service_id INTEGER NOT NULL REFERENCES processing_services (id),
    registered_at REAL NOT NULL,
    PRIMARY KEY (project_id, slug)
);
CREATE TABLE IF NOT EXISTS service_pipelines (
    service_id INTEGER NOT NULL REFERENCES processing_services (id),
    project_id INTEGER NOT NULL,
    slug TEXT NOT NULL,
    PRIMARY KEY (service_id, project_id, slug)
);
CREATE TABLE IF NOT EXISTS algorithms (
    key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    task_type TEXT,
    has_category_map INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pipeline_algorithms (
    project_id INTEGER NOT NULL,
    slug TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (project_id, slug, key)
);
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


DEFAULT_PROJECT_ID = 1
DEFAULT_PROJECT_NAME = "Default project"
FAILURE_THRESHOLD = 0.5  # Antenna: a job whose failed images exceed this fraction ends FAILURE


# Antenna's Algorithm.detection_task_types and .classification_task_types (ami/ml/models/algorithm.py)
DETECTION_TASK_TYPES = ("detection", "localization", "segmentation")
CLASSIFICATION_TASK_TYPES = ("classification", "tagging")


class PipelineNotConfigured(ValueError):
    """Antenna's ``ami.ml.exceptions.PipelineNotConfigured``: a registration it refuses (nothing is stored)."""


class Conflict(ValueError):
    """The request clashes with what is stored; ``field`` names the part of the request at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ImageRecord:
    job_id: int
    image_id: str
    position: int
    url: str
    stream_seq: int | None


@dataclass(frozen=True)
class ResultRecord:
    job_id: int
    image_id: str
    kind: ResultKind
    payload: dict[str, Any]
    first_at: float
    last_at: float
    num_delivered: int | None
    duplicates: int
    dead_lettered: bool = False


@dataclass(frozen=True)
class NewResult:
    """One result to save: which image, success or error, its JSON, and its delivery count."""

    image_id: str
    kind: ResultKind
    payload: str
    num_delivered: int | None = None


@dataclass(frozen=True)
class SaveOutcome:
    """What a save did: ``stored[i]`` is False for a duplicate; ``completed`` if it finished the job."""

    stored: list[bool]
    completed: bool

    @property
    def duplicates(self) -> int:
        return self.stored.count(False)


@dataclass(frozen=True)
class Registration:
    """What a registration did: pipelines created/updated (slugs), algorithms created (keys), the service."""

    pipelines_created: list[str]
    pipelines_updated: list[str]
    algorithms_created: list[str]
    service_id: int


class Store:
    """All reads and writes of the local Antenna's state."""

    def __init__(self, path: str | Path = ":memory:", clock: Callable[[], float] = time.time):
        self.path = str(path)
        self._clock = clock
        self._lock = threading.RLock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self.ensure_project(DEFAULT_PROJECT_ID, DEFAULT_PROJECT_NAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        """Columns added since a database was created (a persistent devstack's ``var/``)."""
        added = {
            "jobs": {"dead_lettered": "INTEGER NOT NULL DEFAULT 0"},
            "results": {"dead_lettered": "INTEGER NOT NULL DEFAULT 0"},
            "algorithms": {"task_type": "TEXT", "has_category_map": "INTEGER NOT NULL DEFAULT 0"},
            "processing_services": {"created_at": "REAL"},
        }
        with self._lock:
            for table, wanted in added.items():
                columns = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                for column, kind in wanted.items():
                    if column not in columns:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    # --- plumbing ------------------------------------------------------------------

    def _tx(self) -> "_Transaction":
        return _Transaction(self._db, self._lock)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # --- jobs --------------------------------------------------------------------------

    def create_job(
        self,
        *,
        pipeline_slug: str,
        images: Sequence[tuple[str | None, str]],
        job_id: int | None = None,
        name: str | None = None,
        project_id: int = 1,
        priority: int = 0,
        dispatch_mode: str = "async_api",
        ack_wait_s: float,
        max_deliver: int,
    ) -> tuple[Job, list[ImageRecord]]:
        """Insert a CREATED job with its images, ``images`` as ``(image_id or None, url)``.

        Image ids not given are drawn from one global counter (Antenna's
        SourceImage pk); given numeric ids move the counter past them so an
        assigned id never collides with a given one. Raises :class:`Conflict`
        for a taken job id or an image id repeated within the job.
        """
        now = self._clock()
        with self._tx() as db:
            if job_id is None:
                job_id = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM jobs").fetchone()[0]
            elif db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
                raise Conflict("id", f"job {job_id} already exists")
            given = [image_id for image_id, _ in images if image_id is not None]
            if len(set(given)) != len(given):
                raise Conflict("images", "image ids repeat within the job")
            numeric = [int(i) for i in given if i.isascii() and i.isdigit()]
            next_pk = self._counter(db, "image_pk")
            if numeric:
                next_pk = max(next_pk, max(numeric) + 1)
            rows = []
            for position, (image_id, url) in enumerate(images):
                if image_id is None:
                    image_id = str(next_pk)
                    next_pk += 1
                rows.append((job_id, image_id, position, url))
            self._set_counter(db, "image_pk", next_pk)
            self._ensure_project(db, project_id, now)
            db.execute(
                "INSERT INTO jobs (id, name, project_id, pipeline_slug, priority, status, dispatch_mode,"
                " ack_wait_s, max_deliver, created_at, total) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    name or f"Job {job_id}",
                    project_id,
                    pipeline_slug,
                    priority,
                    CREATED,
                    dispatch_mode,
                    ack_wait_s,
                    max_deliver,
                    now,
                    len(rows),
                ),
            )
            db.executemany("INSERT INTO images (job_id, image_id, position, url) VALUES (?, ?, ?, ?)", rows)
        job = self.job(job_id)
        assert job is not None
        return job, [ImageRecord(j, i, p, u, None) for j, i, p, u in rows]

    def start_job(self, job_id: int, stream_seqs: dict[str, int]) -> Job:
        """Record where each image's task sits (or will sit) in the stream and mark the job STARTED."""
        with self._tx() as db:
            self._set_seqs(db, job_id, stream_seqs)
            db.execute(
                "UPDATE jobs SET status = ?, started_at = ? WHERE id = ? AND status IN (?, ?)",
                (STARTED, self._clock(), job_id, CREATED, PENDING),
            )
        job = self.job(job_id)
        assert job is not None
        return job

    def mark_pending(self, job_id: int) -> None:
        """CREATED -> PENDING: queued to start (Antenna's ``enqueue``), its tasks not yet published."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = ? WHERE id = ? AND status = ?", (PENDING, job_id, CREATED))

    def record_stream_seqs(self, job_id: int, stream_seqs: dict[str, int]) -> None:
        """Replace the job's stream sequences (when publishing did not land where expected)."""
        with self._tx() as db:
            self._set_seqs(db, job_id, stream_seqs)

    @staticmethod
    def _set_seqs(db: sqlite3.Connection, job_id: int, stream_seqs: dict[str, int]) -> None:
        db.execute("UPDATE images SET stream_seq = NULL WHERE job_id = ?", (job_id,))
        db.executemany(
            "UPDATE images SET stream_seq = ? WHERE job_id = ? AND image_id = ?",
            [(seq, job_id, image_id) for image_id, seq in stream_seqs.items()],
        )

    def unstart_job(self, job_id: int) -> None:
        """Back to CREATED, without stream sequences (starting it failed half way)."""
        with self._tx() as db:
            db.execute("UPDATE images SET stream_seq = NULL WHERE job_id = ?", (job_id,))
            db.execute("UPDATE jobs SET status = ?, started_at = NULL WHERE id = ?", (CREATED, job_id))

    def discard_job(self, job_id: int) -> None:
        """Forget a job that never started (its NATS setup failed)."""
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ? AND status IN (?, ?)", (job_id, CREATED, PENDING))

    def cancel_job(self, job_id: int) -> bool:
        """CANCELING (REVOKED at once if it never started), unless final or already
        cancelling; True if this call changed it. :meth:`mark_cleaned` makes it REVOKED."""
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET status = CASE WHEN started_at IS NULL THEN ? ELSE ? END, cancelled_at = ?"
                f" WHERE id = ? AND status NOT IN ({_marks(FINAL_STATES)}, ?)",
                (REVOKED, CANCELING, self._clock(), job_id, *FINAL_STATES, CANCELING),
            )
            return cur.rowcount == 1

    def job(self, job_id: int) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list_jobs(
        self,
        *,
        pipelines: Iterable[str] | None = None,
        incomplete_only: bool = False,
        dispatch_mode: str | None = None,
        statuses: Iterable[str] | None = None,
        order: Literal["random", "newest", "oldest"] = "newest",
        limit: int | None = None,
        offset: int = 0,
    ) -> tuple[int, list[Job]]:
        """Filtered jobs as ``(count of all matches, the requested page)``."""
        where, params = [], []
        if pipelines is not None:
            pipelines = list(pipelines)
            where.append(f"pipeline_slug IN ({_marks(pipelines)})")
            params += pipelines
        if incomplete_only:
            where.append(f"status NOT IN ({_marks(FINAL_STATES)})")
            params += FINAL_STATES
        if dispatch_mode is not None:
            where.append("dispatch_mode = ?")
            params.append(dispatch_mode)
        if statuses is not None:
            statuses = list(statuses)
            where.append(f"status IN ({_marks(statuses)})")
            params += statuses
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        order_by = {"random": "RANDOM()", "newest": "id DESC", "oldest": "id"}[order]
        with self._lock:
            count = self._db.execute(f"SELECT COUNT(*) FROM jobs{clause}", params).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM jobs{clause} ORDER BY {order_by} LIMIT ? OFFSET ?",
                [*params, -1 if limit is None else limit, offset],
            ).fetchall()
        return count, [_job(r) for r in rows]

    def active_job_ids(self) -> list[int]:
        rows = self._query(f"SELECT id FROM jobs WHERE status IN ({_marks(ACTIVE_STATES)}) ORDER BY id", ACTIVE_STATES)
        return [r[0] for r in rows]

    def uncleaned_job_ids(self) -> list[int]:
        """Final jobs that once had NATS resources not yet deleted (cleanup failed or was cut short)."""
        rows = self._query(
            f"SELECT id FROM jobs WHERE status IN ({_marks(FINAL_STATES)}, ?) AND started_at IS NOT NULL"
            " AND nats_cleaned = 0 ORDER BY id",
            (*FINAL_STATES, CANCELING),
        )
        return [r[0] for r in rows]

    def set_stats(self, job_id: int, stats: ConsumerStats) -> None:
        """Record a sample of the job's consumer statistics (cumulative counts never decrease)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET messages = ?, pending = ?, ack_pending = ?, redelivered = ?,"
                " deliveries = MAX(deliveries, ?), redeliveries = MAX(redeliveries, ?), stats_at = ?"
                " WHERE id = ? AND nats_cleaned = 0",
                (
                    stats.messages,
                    stats.pending,
                    stats.ack_pending,
                    stats.redelivered,
                    stats.deliveries,
                    stats.redeliveries,
                    self._clock(),
                    job_id,
                ),
            )

    def mark_cleaned(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET nats_cleaned = 1 WHERE id = ?", (job_id,))
            db.execute("UPDATE jobs SET status = ? WHERE id = ? AND status = ?", (REVOKED, job_id, CANCELING))

    # --- images ---------------------------------------------------------------------------

    def images(self, job_id: int) -> list[ImageRecord]:
        rows = self._query("SELECT * FROM images WHERE job_id = ? ORDER BY position", (job_id,))
        return [ImageRecord(r["job_id"], r["image_id"], r["position"], r["url"], r["stream_seq"]) for r in rows]

    def images_by_seq(self, job_id: int, seqs: Iterable[int]) -> dict[int, str]:
        """``{stream_seq: image_id}`` for those of ``seqs`` that are this job's tasks."""
        seqs = sorted(set(seqs))
        if not seqs:
            return {}
        rows = self._query(
            f"SELECT stream_seq, image_id FROM images WHERE job_id = ? AND stream_seq IN ({_marks(seqs)})",
            (job_id, *seqs),
        )
        return {r[0]: r[1] for r in rows}

    def image_ids(self, job_id: int, image_ids: Iterable[str]) -> set[str]:
        """Those of ``image_ids`` that are images of this job."""
        wanted = sorted({i for i in image_ids if i})
        if not wanted:
            return set()
        rows = self._query(
            f"SELECT image_id FROM images WHERE job_id = ? AND image_id IN ({_marks(wanted)})", (job_id, *wanted)
        )
        return {r[0] for r in rows}

    # --- results ------------------------------------------------------------------------

    def save_results(self, job_id: int, results: Sequence[NewResult]) -> SaveOutcome:
        """Save results idempotently (first per image wins) and complete the job if it is done."""
        now = self._clock()
        stored = []
        with self._tx() as db:
            for r in results:
                cur = db.execute(
                    "INSERT INTO results (job_id, image_id, kind, payload, first_at, last_at, num_delivered)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, image_id) DO NOTHING",
                    (job_id, r.image_id, r.kind, r.payload, now, now, r.num_delivered),
                )
                if cur.rowcount == 1:
                    stored.append(True)
                else:
                    db.execute(
                        "UPDATE results SET duplicates = duplicates + 1, last_at = ? WHERE job_id = ? AND image_id = ?",
                        (now, job_id, r.image_id),
                    )
                    stored.append(False)
            completed = self._count(db, job_id, [r for r, s in zip(results, stored) if s], stored.count(False), now)
        return SaveOutcome(stored, completed)

    def record_dead_letters(self, job_id: int, image_ids: Iterable[str], error: str) -> SaveOutcome:
        """An error result for each image that has none yet (a dead letter is not a duplicate)."""
        now = self._clock()
        new: list[NewResult] = []
        stored = []
        with self._tx() as db:
            for image_id in image_ids:
                payload = json.dumps({"error": error, "image_id": image_id})
                cur = db.execute(
                    "INSERT INTO results (job_id, image_id, kind, payload, first_at, last_at, dead_lettered)"
                    " VALUES (?, ?, 'error', ?, ?, ?, 1) ON CONFLICT (job_id, image_id) DO NOTHING",
                    (job_id, image_id, payload, now, now),
                )
                stored.append(cur.rowcount == 1)
                if cur.rowcount == 1:
                    new.append(NewResult(image_id, "error", payload))
            db.execute("UPDATE jobs SET dead_lettered = dead_lettered + ? WHERE id = ?", (len(new), job_id))
            completed = self._count(db, job_id, new, 0, now)
        return SaveOutcome(stored, completed)

    def _count(self, db: sqlite3.Connection, job_id: int, new: list[NewResult], duplicates: int, now: float) -> bool:
        ok = sum(1 for r in new if r.kind == "ok")
        db.execute(
            "UPDATE jobs SET results = results + ?, errors = errors + ?, duplicates = duplicates + ?,"
            " first_result_at = CASE WHEN first_result_at IS NULL AND ? > 0 THEN ? ELSE first_result_at END,"
            " last_result_at = CASE WHEN ? > 0 THEN ? ELSE last_result_at END"
            " WHERE id = ?",
            (ok, len(new) - ok, duplicates, len(new), now, len(new), now, job_id),
        )
        cur = db.execute(
            "UPDATE jobs SET status = CASE WHEN errors * 1.0 > total * ? THEN ? ELSE ? END, completed_at = ?"
            f" WHERE id = ? AND status IN ({_marks(ACTIVE_STATES)}) AND results + errors >= total",
            (FAILURE_THRESHOLD, FAILURE, SUCCESS, now, job_id, *ACTIVE_STATES),
        )
        return cur.rowcount == 1

    def dead_lettered(self, job_id: int) -> int:
        """Images of the job whose only answer came from the dead-letter reaper (work never done)."""
        rows = self._query("SELECT COUNT(*) FROM results WHERE job_id = ? AND dead_lettered = 1", (job_id,))
        return rows[0][0]

    def results(self, job_id: int) -> list[ResultRecord]:
        rows = self._query("SELECT * FROM results WHERE job_id = ? ORDER BY first_at, image_id", (job_id,))
        return [
            ResultRecord(
                r["job_id"],
                r["image_id"],
                r["kind"],
                json.loads(r["payload"]),
                r["first_at"],
                r["last_at"],
                r["num_delivered"],
                r["duplicates"],
                bool(r["dead_lettered"]),
            )
            for r in rows
        ]

    # --- pipelines ----------------------------------------------------------------------

    def register_pipelines(
        self, project_id: int, service_name: str, pipelines: Sequence[dict[str, Any]]
    ) -> tuple[list[str], list[str], int]:
        """Upsert a processing service's pipelines: ``(created slugs, updated slugs, service id)``."""
        outcome = self.register(project_id, service_name, pipelines)
        return outcome.pipelines_created, outcome.pipelines_updated, outcome.service_id

    def register(
        self,
        project_id: int,
        service_name: str,
        pipelines: Sequence[dict[str, Any]],
        *,
        category_maps_assumed: bool = False,
    ) -> "Registration":
        """Antenna's ``create_pipelines``: pipelines upserted per (project, slug), their algorithms
        created once (by key) and added to the pipeline (never removed: a union across services).
        The service is marked seen (Antenna's ``mark_seen`` after a registration).

        All or nothing, as Antenna's (one transaction): a classification algorithm (task type
        ``classification`` or ``tagging``) registered with no category map, and with none from an
        earlier registration, raises :class:`PipelineNotConfigured` and nothing is stored
        (``get_or_create_algorithm_and_category_map``). ``category_maps_assumed``: the devstack's
        pre-registration, which declares algorithms by name and key only, as if their maps had been
        sent (an operator's ``register`` sends them)."""
        now = self._clock()
        created, updated, algorithms_created = [], [], []
        with self._tx() as db:
            self._ensure_project(db, project_id, now)
            db.execute(
                "INSERT INTO processing_services (project_id, name, last_seen_at, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (project_id, name) DO UPDATE SET last_seen_at = excluded.last_seen_at",
                (project_id, service_name, now, now),
            )
            service_id = db.execute(
                "SELECT id FROM processing_services WHERE project_id = ? AND name = ?", (project_id, service_name)
            ).fetchone()[0]
            for p in pipelines:
                exists = db.execute(
                    "SELECT 1 FROM pipelines WHERE project_id = ? AND slug = ?", (project_id, p["slug"])
                ).fetchone()
                db.execute(
                    "INSERT INTO pipelines (project_id, slug, name, version, config, processing_service_id, registered_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (project_id, slug) DO UPDATE SET name = excluded.name,"
                    " version = excluded.version, config = excluded.config,"
                    " processing_service_id = excluded.processing_service_id, registered_at = excluded.registered_at",
                    (project_id, p["slug"], p["name"], p["version"], json.dumps(p), service_id, now),
                )
                (updated if exists else created).append(p["slug"])
                db.execute(
                    "INSERT INTO service_pipelines (service_id, project_id, slug) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (service_id, project_id, p["slug"]),
                )
                for algorithm in p.get("algorithms") or ():
                    key, task_type = algorithm["key"], algorithm.get("task_type")
                    category_map = algorithm.get("category_map")
                    with_map = category_maps_assumed or bool(category_map and category_map.get("data"))
                    row = db.execute("SELECT has_category_map FROM algorithms WHERE key = ?", (key,)).fetchone()
                    if (
                        not category_maps_assumed and category_map is None and task_type in CLASSIFICATION_TASK_TYPES
                        and not (row and row[0])
                    ):
                        raise PipelineNotConfigured(
                            f"No valid category map found for algorithm '{key}' with task type '{task_type}' or in the "
                            "pipeline /info response. Update the processing service to include a category map for all "
                            "classification algorithms then re-register the pipelines."
                        )
                    cur = db.execute(
                        "INSERT INTO algorithms (key, name, created_at, task_type, has_category_map)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET task_type = excluded.task_type,"
                        " has_category_map = MAX(has_category_map, excluded.has_category_map)",
                        (key, algorithm.get("name") or key, now, task_type, int(with_map)),
                    )
                    if row is None:
                        algorithms_created.append(key)
                    db.execute(
                        "INSERT INTO pipeline_algorithms (project_id, slug, key) VALUES (?, ?, ?)"
                        " ON CONFLICT DO NOTHING",
                        (project_id, p["slug"], algorithm["key"]),
                    )
        return Registration(created, updated, algorithms_created, service_id)

    # --- processing services and their liveness ---------------------------------------------

    def mark_services_seen(
        self, *, slugs: Sequence[str] | None = None, project_id: int | None = None
    ) -> int:
        """Mark processing services seen now; returns how many. Antenna's heartbeat tasks
        (``ami/jobs/tasks.py``): ``slugs`` alone, every service linked to any of those pipelines in any
        project (``update_async_services_seen_for_pipelines``); ``project_id`` alone, every service
        of the project (``update_async_services_seen_for_project``); both, the services linked to
        those pipelines within the project (``update_pipeline_pull_services_seen``)."""
        where, params = [], []
        if slugs is not None:
            slugs = list(slugs)
            if not slugs:
                return 0
            where.append(f"id IN (SELECT service_id FROM service_pipelines WHERE slug IN ({_marks(slugs)})"
                         + (" AND project_id = ?)" if project_id is not None else ")"))
            params += [*slugs, *([project_id] if project_id is not None else [])]
        elif project_id is not None:
            where.append("project_id = ?")
            params.append(project_id)
        else:
            return 0
        with self._tx() as db:
            cur = db.execute(f"UPDATE processing_services SET last_seen_at = ? WHERE {' AND '.join(where)}",
                             [self._clock(), *params])
            return cur.rowcount

    def processing_services(self, project_id: int | None = None) -> list[dict[str, Any]]:
        """Each service: ``{id, name, project_id, last_seen_at, created_at, pipelines: [slug]}``, by id."""
        rows = self._query(
            "SELECT * FROM processing_services" + (" WHERE project_id = ?" if project_id is not None else "")
            + " ORDER BY id",
            (project_id,) if project_id is not None else (),
        )
        out = []
        for r in rows:
            slugs = self._query("SELECT slug FROM service_pipelines WHERE service_id = ? ORDER BY slug", (r["id"],))
            out.append({**dict(r), "pipelines": [x[0] for x in slugs]})
        return out

    def detection_algorithms(self, project_id: int, slug: str) -> list[str]:
        """Keys of the pipeline's algorithms whose task type is a detection type (Antenna saves a
        pipeline's results only when there is exactly one)."""
        rows = self._query(
            f"SELECT a.key FROM pipeline_algorithms pa JOIN algorithms a ON a.key = pa.key WHERE pa.project_id = ?"
            f" AND pa.slug = ? AND a.task_type IN ({_marks(DETECTION_TASK_TYPES)}) ORDER BY a.key",
            (project_id, slug, *DETECTION_TASK_TYPES),
        )
        return [r[0] for r in rows]

    def algorithm_keys(self, project_id: int, slug: str) -> set[str]:
        """Keys of the algorithms registered for this project's pipeline (empty if it is not registered)."""
        rows = self._query("SELECT key FROM pipeline_algorithms WHERE project_id = ? AND slug = ?", (project_id, slug))
        return {r[0] for r in rows}

    def pipelines(self, project_id: int) -> list[dict[str, Any]]:
        rows = self._query("SELECT config FROM pipelines WHERE project_id = ? ORDER BY slug", (project_id,))
        return [json.loads(r[0]) for r in rows]

    def pipeline_config(self, project_id: int, slug: str) -> dict[str, Any] | None:
        """The configuration last registered for the project's pipeline (None: never registered)."""
        rows = self._query("SELECT config FROM pipelines WHERE project_id = ? AND slug = ?", (project_id, slug))
        return json.loads(rows[0][0]) if rows else None

    # --- projects -------------------------------------------------------------------------

    def ensure_project(self, project_id: int, name: str | None = None) -> None:
        """A project exists once it is referenced (a job, a registration), unlike Antenna, where it must be
        created first: the stand-in has no UI to create one. Project 1 always exists."""
        now = self._clock()
        with self._tx() as db:
            self._ensure_project(db, project_id, now, name)

    @staticmethod
    def _ensure_project(db: sqlite3.Connection, project_id: int, now: float, name: str | None = None) -> None:
        db.execute(
            "INSERT INTO projects (id, name, created_at, updated_at) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (project_id, name or f"Project {project_id}", now, now),
        )

    def projects(self, limit: int | None = None, offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """``(count, page)`` of projects by id, each ``{id, name, description, created_at, updated_at,
        deployments_count}`` (a deployment here: a distinct pipeline of the project's jobs, as a count only)."""
        with self._lock:
            count = self._db.execute("SELECT COUNT(*) FROM projects").fetchone()[0]
            rows = self._db.execute(
                "SELECT p.*, (SELECT COUNT(DISTINCT j.pipeline_slug) FROM jobs j WHERE j.project_id = p.id)"
                " AS deployments_count FROM projects p ORDER BY p.id LIMIT ? OFFSET ?",
                (-1 if limit is None else limit, offset),
            ).fetchall()
        return count, [dict(r) for r in rows]

    def project(self, project_id: int) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT p.*, (SELECT COUNT(DISTINCT j.pipeline_slug) FROM jobs j WHERE j.project_id = p.id)"
            " AS deployments_count FROM projects p WHERE p.id = ?",
            (project_id,),
        )
        return dict(rows[0]) if rows else None

    # --- counters -------------------------------------------------------------------------

    @staticmethod
    def _counter(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 1

    @staticmethod
    def _set_counter(db: sqlite3.Connection, name: str, value: int) -> None:
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )


class _Transaction:
    """``with store._tx() as db:`` one locked ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self._db = db
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


def _job(row: sqlite3.Row) -> Job:
    return Job.model_validate(dict(row))
