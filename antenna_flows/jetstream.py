"""Antenna's per-job JetStream layout, and the operations both sides need on it.

Layout (antenna-contract.md): stream ``job_{id}`` on subject ``job.{id}.tasks``
(max_age 24 h), durable pull consumer ``job-{id}-consumer`` (explicit ack,
deliver all, ``ack_wait`` / ``max_deliver`` / ``max_ack_pending`` from
settings), and the dead-letter path: stream ``advisories`` on
``$JS.EVENT.ADVISORY.>`` with a durable ``job-{id}-dlq`` per job on the
max-deliveries advisory of that job's consumer.

The API side creates, publishes, fetches (as Antenna does: one fetch, 0.5 s
timeout), acks and deletes. The worker side only *binds* to existing
consumers, never creates or alters them, and reserves with ``no_wait`` pulls:
it gets exactly what is available now, at once, and leaves no lingering pull
request on the server that could reserve tasks behind its back.

(This module is long because the layout's names, the connection, the consumer's side and
its statistics are one contract: splitting them would scatter Antenna's naming.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from antenna_flows.schemas import PipelineProcessingTask

log = logging.getLogger(__name__)

STREAM_MAX_AGE_S = 24 * 3600
ADVISORY_STREAM = "advisories"
ADVISORY_SUBJECTS = ["$JS.EVENT.ADVISORY.>"]
ADVISORY_MAX_AGE_S = 3600
STREAM_CREATED_SUBJECT = "$JS.EVENT.ADVISORY.STREAM.CREATED.*"
ROLL_CALL_SUBJECT = "antenna_flows.workers"  # workers say who they are (core NATS, nothing stored)
PULL_TIMEOUT_S = 1.0  # an answer to a no_wait pull comes in ~1 ms; this bounds a dead or reconnecting server


def stream_name(job_id: int) -> str:
    return f"job_{job_id}"


def subject_name(job_id: int) -> str:
    return f"job.{job_id}.tasks"


def consumer_name(job_id: int) -> str:
    return f"job-{job_id}-consumer"


def dlq_name(job_id: int) -> str:
    return f"job-{job_id}-dlq"


def max_deliveries_subject(job_id: int) -> str:
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream_name(job_id)}.{consumer_name(job_id)}"


def job_id_from_stream(name: str) -> int | None:
    if name.startswith("job_"):
        try:
            return int(name[4:])
        except ValueError:
            return None
    return None


class StreamGone(Exception):
    """The job's stream or consumer no longer exists (job completed or cancelled)."""

    def __init__(self, job_id: int):
        super().__init__(f"job {job_id}: stream or consumer is gone")
        self.job_id = job_id


@dataclass(frozen=True)
class QueueConfig:
    ack_wait_s: float = 300.0
    max_deliver: int = 5
    max_ack_pending: int = 1000


@dataclass(frozen=True)
class AckSubject:
    """The parts of a JetStream ack reply subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...``)."""

    stream: str
    consumer: str
    num_delivered: int
    stream_seq: int
    consumer_seq: int  # deliveries the consumer had made, all clients together: a fleet's share shows in it
    pending: int | None = None  # messages not yet delivered when this one was (the consumer's num_pending)


def parse_ack_subject(reply: str) -> AckSubject | None:
    """Parse both the v1 (9 tokens) and v2 (domain + account hash, 11-12 tokens) forms."""
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    if len(tokens) == 9:
        offset = 2
    elif len(tokens) >= 11:
        offset = 4
    else:
        return None
    try:
        return AckSubject(
            stream=tokens[offset],
            consumer=tokens[offset + 1],
            num_delivered=int(tokens[offset + 2]),
            stream_seq=int(tokens[offset + 3]),
            consumer_seq=int(tokens[offset + 4]),
            pending=int(tokens[offset + 6]) if len(tokens) > offset + 6 else None,
        )
    except ValueError:
        return None


@dataclass
class ConsumerStats:
    """What the field report's table shows per job, plus cumulative deliveries.

    NATS's ``num_redelivered`` only counts redelivered messages still unacked;
    ``redeliveries`` (deliveries beyond the first of each message, read from the
    consumer's delivered sequences) is cumulative and survives the acks.
    """

    job_id: int
    messages: int
    pending: int
    ack_pending: int
    redelivered: int
    delivered_msgs: int
    deliveries: int
    ack_wait_s: float
    max_deliver: int
    ack_floor: int = 0  # every message up to this stream sequence is acked (saved, for Antenna's tasks)

    @property
    def done(self) -> int:
        """Messages delivered and no longer awaiting an ack: Antenna saved (acked) them, or they were terminated."""
        return max(0, self.delivered_msgs - self.ack_pending)

    @property
    def redeliveries(self) -> int:
        return max(0, self.deliveries - self.delivered_msgs)


@dataclass
class Reservation:
    """A task reserved by this process: its parsed body, its ack subject and when we got it.

    ``msg`` is the NATS message when reserved straight from JetStream (it can then
    be acked, nak'ed and kept alive with +WPI); tasks reserved through Antenna's
    REST endpoint only carry the reply subject.
    """

    job_id: int
    task: PipelineProcessingTask | None
    parse_error: str | None
    reply_subject: str
    msg: Msg | None = None
    loose_image_id: str | None = None  # for a malformed body: the image id it names, if any (to answer it)
    reserved_at: float = field(default_factory=time.monotonic)
    touched_at: float = 0.0  # last +WPI (0: none yet, the reservation itself counts)

    @property
    def num_delivered(self) -> int:
        info = parse_ack_subject(self.reply_subject or "")
        return info.num_delivered if info else 1

    @property
    def stream_seq(self) -> int | None:
        info = parse_ack_subject(self.reply_subject or "")
        return info.stream_seq if info else None

    @property
    def ack_info(self) -> AckSubject | None:
        """Everything the reply subject tells (delivery count, sequences, what was still pending)."""
        return parse_ack_subject(self.reply_subject or "")

    @property
    def image_id(self) -> str | None:
        return self.task.image_id if self.task else self.loose_image_id


MAX_TASK_BYTES = 64 * 1024  # Antenna's task bodies are ~200 bytes
MAX_TASK_ID_CHARS = 1000  # id / image_id: a SourceImage pk as text


def task_problem(task: PipelineProcessingTask) -> str | None:
    """Why a well-formed task is still unacceptable (absurd ids), or None."""
    for name in ("id", "image_id"):
        value = getattr(task, name)
        if len(value) > MAX_TASK_ID_CHARS:
            return f"malformed task: {name} of {len(value)} characters, more than {MAX_TASK_ID_CHARS}"
    return None


def parse_task(data: bytes) -> tuple[PipelineProcessingTask | None, str | None]:
    """The task in a message body, or (None, why not): never raises, whatever the bytes."""
    if len(data) > MAX_TASK_BYTES:
        return None, f"malformed task: body of {len(data)} bytes, more than {MAX_TASK_BYTES}"
    try:
        task = PipelineProcessingTask.model_validate_json(data)
        problem = task_problem(task)
        return (None, problem) if problem else (task, None)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        return None, f"malformed task: {first.get('msg', 'invalid')} at {'.'.join(map(str, first.get('loc', ())))}"
    except ValueError as exc:  # pragma: no cover - pydantic wraps JSON errors in ValidationError
        return None, f"malformed task: {exc}"


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, NotFoundError) or getattr(exc, "code", None) == 404


FIRST_CONNECT_S = 15.0  # a NATS that never answered at start is a configuration problem, not an outage


async def connect(url: str, name: str = "antenna-flows", first_connect_s: float | None = None,
                  **options: Any) -> NATS:
    """Connect, then reconnect forever: a NATS restart is an outage, not an error.

    ``first_connect_s`` bounds the first connection (a URL nothing answers at): after it,
    :class:`~antenna_flows.unreachable.ServiceUnreachable` names NATS and the URL.
    """
    failures: list[str] = []

    async def quiet(exc: Exception) -> None:  # nats-py's default prints a traceback per attempt
        if not failures or str(exc) != failures[-1]:
            log.warning("NATS at %s: %s", url, exc)
        failures.append(str(exc))

    opts: dict[str, Any] = dict(
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=quiet,
    )
    opts.update(options)
    if first_connect_s is None:
        return await nats.connect(url, **opts)
    try:
        return await asyncio.wait_for(nats.connect(url, **opts), first_connect_s)
    except (asyncio.TimeoutError, OSError, nats.errors.Error) as exc:
        from antenna_flows.unreachable import ServiceUnreachable

        why = failures[-1] if failures else f"{type(exc).__name__}: {exc}".rstrip(": ")
        raise ServiceUnreachable("NATS", url, f"no answer within {first_connect_s:g}s: {why}") from exc


class JobQueue:
    """Antenna's job streams on one NATS connection."""

    def __init__(self, nc: NATS, config: QueueConfig | None = None):
        self.nc = nc
        self.js = nc.jetstream()
        self.config = config or QueueConfig()
        self._inboxes: dict[int, _Inbox] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    @classmethod
    async def connect(cls, url: str, config: QueueConfig | None = None, name: str = "antenna-flows",
                      first_connect_s: float | None = None) -> "JobQueue":
        return cls(await connect(url, name=name, first_connect_s=first_connect_s), config)

    async def close(self) -> None:
        for inbox in list(self._inboxes.values()):
            await inbox.close()
        self._inboxes.clear()
        if not self.nc.is_closed:
            await self.nc.drain() if self.nc.is_connected else await self.nc.close()

    async def job_streams(self) -> list[int]:
        """Job ids of every ``job_*`` stream on the server."""
        ids = []
        for info in await self.js.streams_info():
            job_id = job_id_from_stream(info.config.name or "")
            if job_id is not None:
                ids.append(job_id)
        return sorted(ids)

    async def stats(self, job_id: int) -> ConsumerStats:
        try:
            info = await self.js.consumer_info(stream_name(job_id), consumer_name(job_id))
        except NotFoundError as exc:
            raise StreamGone(job_id) from exc
        return ConsumerStats(
            job_id=job_id,
            messages=(info.delivered.stream_seq if info.delivered else 0) + (info.num_pending or 0),
            pending=info.num_pending or 0,
            ack_pending=info.num_ack_pending or 0,
            redelivered=info.num_redelivered or 0,
            delivered_msgs=info.delivered.stream_seq if info.delivered else 0,
            deliveries=info.delivered.consumer_seq if info.delivered else 0,
            ack_wait_s=float(info.config.ack_wait or self.config.ack_wait_s),
            max_deliver=int(info.config.max_deliver or -1),
            ack_floor=info.ack_floor.stream_seq if info.ack_floor else 0,
        )

    async def reserve(self, job_id: int, n: int) -> list[Reservation]:
        """Reserve up to ``n`` tasks available right now (``no_wait`` pull; ~1 ms).

        Returns ``[]`` when nothing is available; raises :class:`StreamGone` when the
        job's stream or consumer was deleted.
        """
        if n < 1:
            return []
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            inbox = self._inboxes.get(job_id)
            if inbox is None:
                inbox = self._inboxes[job_id] = await _Inbox.open(self.nc)
            # A late message from an earlier pull that timed out would be ours too.
            out: list[Reservation] = []
            while len(out) < n and (msg := inbox.get_nowait()) is not None:
                if not is_status(msg):
                    out.append(_reservation(job_id, msg))
            if len(out) >= n:
                return out
            await self.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{stream_name(job_id)}.{consumer_name(job_id)}",
                json.dumps({"batch": n - len(out), "no_wait": True}).encode(),
                reply=inbox.subject,
            )
            while len(out) < n:
                try:
                    msg = await inbox.next(timeout=PULL_TIMEOUT_S)
                except asyncio.TimeoutError:
                    break
                status = is_status(msg)
                if status is None:
                    out.append(_reservation(job_id, msg))
                    continue
                if status == "404" and "No Messages" not in (msg.headers or {}).get("Description", "No Messages"):
                    await self._forget(job_id)
                    raise StreamGone(job_id)
                if status in ("404", "408", "409"):
                    if status == "409" and "Consumer Deleted" in (msg.headers or {}).get("Description", ""):
                        await self._forget(job_id)
                        raise StreamGone(job_id)
                    break
                if status == "503":  # JetStream has no responders: stream or consumer missing
                    await self._forget(job_id)
                    raise StreamGone(job_id)
            if not out and not await self.exists(job_id):
                await self._forget(job_id)
                raise StreamGone(job_id)
            return out

    async def exists(self, job_id: int) -> bool:
        try:
            await self.js.consumer_info(stream_name(job_id), consumer_name(job_id))
            return True
        except NotFoundError:
            return False

    async def ack_wait(self, job_id: int) -> float:
        """The consumer's ack_wait in seconds, read from its config (Antenna owns it)."""
        return (await self.stats(job_id)).ack_wait_s

    async def forget(self, job_id: int) -> None:
        await self._forget(job_id)

    async def _forget(self, job_id: int) -> None:
        inbox = self._inboxes.pop(job_id, None)
        self._locks.pop(job_id, None)
        if inbox is not None:
            await inbox.close()

    async def watch_new_jobs(self, callback: Callable[[int], Awaitable[None] | None]) -> Any:
        """Call ``callback(job_id)`` whenever a ``job_*`` stream is created (JetStream advisory)."""

        async def handler(msg: Msg) -> None:
            name = msg.subject.rsplit(".", 1)[-1]
            job_id = job_id_from_stream(name)
            if job_id is not None:
                result = callback(job_id)
                if asyncio.iscoroutine(result):
                    await result

        return await self.nc.subscribe(STREAM_CREATED_SUBJECT, cb=handler)

    async def announce(self, worker: str, pipelines: list[str], holding: int | None = None) -> None:
        """Say on the roll-call subject that this worker is serving these pipelines, and how many tasks it
        holds unanswered (a core NATS publish)."""
        said: dict[str, Any] = {"worker": worker, "pipelines": pipelines}
        if holding is not None:
            said["holding"] = holding
        await self.nc.publish(ROLL_CALL_SUBJECT, json.dumps(said).encode())

    async def watch_roll_call(self, callback: Callable[[str, list[str], int | None], None]) -> Any:
        """Call ``callback(worker, pipelines, holding)`` for every worker's announcement (this one's included;
        ``holding`` None from a worker that does not say it)."""

        async def handler(msg: Msg) -> None:
            try:
                said = json.loads(msg.data)
                worker, pipelines = str(said["worker"]), [str(p) for p in said.get("pipelines") or []]
                holding = said.get("holding")
                holding = int(holding) if isinstance(holding, (int, float)) and holding >= 0 else None
            except (ValueError, KeyError, TypeError, AttributeError):
                return  # not one of ours
            callback(worker, pipelines, holding)

        return await self.nc.subscribe(ROLL_CALL_SUBJECT, cb=handler)


def is_status(msg: Msg) -> str | None:
    """The status code of a JetStream status message (no data, a Status header), else None."""
    if msg.headers and "Status" in msg.headers and not msg.data:
        return msg.headers.get("Status")
    return None


def loose_image_id(data: bytes) -> str | None:
    """The ``image_id`` a malformed body still names (a number, or a short string), else None."""
    if len(data) > MAX_TASK_BYTES:
        return None
    try:
        value = json.loads(data).get("image_id")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    return text if 0 < len(text) <= MAX_TASK_ID_CHARS else None


def _reservation(job_id: int, msg: Msg) -> Reservation:
    task, error = parse_task(msg.data)
    return Reservation(job_id=job_id, task=task, parse_error=error, reply_subject=msg.reply, msg=msg,
                       loose_image_id=None if task else loose_image_id(msg.data))


class _Inbox:
    """A reply inbox of our own: pull answers land in a queue we can drain without waiting."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.subject = ""
        self.sub: Any = None

    @classmethod
    async def open(cls, nc: NATS) -> "_Inbox":
        inbox = cls()
        inbox.subject = nc.new_inbox()

        async def deliver(msg: Msg) -> None:
            inbox.queue.put_nowait(msg)

        inbox.sub = await nc.subscribe(inbox.subject, cb=deliver)
        return inbox

    def get_nowait(self) -> Msg | None:
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def next(self, timeout: float) -> Msg:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def close(self) -> None:
        try:
            await self.sub.unsubscribe()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
