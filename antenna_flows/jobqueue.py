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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError, ServiceUnavailableError
from pydantic import ValidationError

from antenna_flows.schemas import PipelineProcessingTask

log = logging.getLogger(__name__)

STREAM_MAX_AGE_S = 24 * 3600
ADVISORY_STREAM = "advisories"
ADVISORY_SUBJECTS = ["$JS.EVENT.ADVISORY.>"]
ADVISORY_MAX_AGE_S = 3600
STREAM_CREATED_SUBJECT = "$JS.EVENT.ADVISORY.STREAM.CREATED.*"
PUBLISH_WINDOW = 256  # task publishes awaiting their JetStream ack at once
PULL_TIMEOUT_S = 5.0  # an answer to a no_wait pull comes in ~1 ms; this only bounds a dead server


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
    consumer_seq: int


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
    def image_id(self) -> str | None:
        return self.task.image_id if self.task else None


def parse_task(data: bytes) -> tuple[PipelineProcessingTask | None, str | None]:
    try:
        return PipelineProcessingTask.model_validate_json(data), None
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        return None, f"malformed task: {first.get('msg', 'invalid')} at {'.'.join(map(str, first.get('loc', ())))}"
    except ValueError as exc:  # pragma: no cover - pydantic wraps JSON errors in ValidationError
        return None, f"malformed task: {exc}"


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, NotFoundError) or getattr(exc, "code", None) == 404


async def connect(url: str, name: str = "antenna-flows", **options: Any) -> NATS:
    """Connect with reconnects forever: a NATS restart is an outage, not an error."""
    opts: dict[str, Any] = dict(
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        allow_reconnect=True,
    )
    opts.update(options)
    return await nats.connect(url, **opts)


class JobQueue:
    """Antenna's job streams on one NATS connection."""

    def __init__(self, nc: NATS, config: QueueConfig | None = None):
        self.nc = nc
        self.js = nc.jetstream()
        self.config = config or QueueConfig()
        self._inboxes: dict[int, Any] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    @classmethod
    async def connect(cls, url: str, config: QueueConfig | None = None, name: str = "antenna-flows") -> "JobQueue":
        return cls(await connect(url, name=name), config)

    async def close(self) -> None:
        for sub in list(self._inboxes.values()):
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        self._inboxes.clear()
        if not self.nc.is_closed:
            await self.nc.drain() if self.nc.is_connected else await self.nc.close()

    # --- Antenna side: job lifecycle ------------------------------------------------

    async def ensure_advisory_stream(self) -> None:
        try:
            await self.js.stream_info(ADVISORY_STREAM)
        except NotFoundError:
            await self.js.add_stream(
                StreamConfig(
                    name=ADVISORY_STREAM,
                    subjects=ADVISORY_SUBJECTS,
                    max_age=ADVISORY_MAX_AGE_S,
                    storage=StorageType.FILE,
                )
            )

    async def create_job(self, job_id: int) -> None:
        """Create stream, consumer and dead-letter consumer (idempotent), as Antenna does."""
        await self.ensure_advisory_stream()
        try:
            await self.js.stream_info(stream_name(job_id))
        except NotFoundError:
            await self.js.add_stream(
                StreamConfig(
                    name=stream_name(job_id),
                    subjects=[subject_name(job_id)],
                    max_age=STREAM_MAX_AGE_S,
                    storage=StorageType.FILE,
                )
            )
        try:
            await self.js.consumer_info(stream_name(job_id), consumer_name(job_id))
        except NotFoundError:
            await self.js.add_consumer(
                stream_name(job_id),
                ConsumerConfig(
                    durable_name=consumer_name(job_id),
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=self.config.ack_wait_s,
                    max_deliver=self.config.max_deliver,
                    max_ack_pending=self.config.max_ack_pending,
                    filter_subject=subject_name(job_id),
                ),
            )
        try:
            await self.js.consumer_info(ADVISORY_STREAM, dlq_name(job_id))
        except NotFoundError:
            await self.js.add_consumer(
                ADVISORY_STREAM,
                ConsumerConfig(
                    durable_name=dlq_name(job_id),
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    filter_subject=max_deliveries_subject(job_id),
                ),
            )

    async def publish_tasks(self, job_id: int, tasks: list[PipelineProcessingTask]) -> list[int]:
        """Publish task bodies (without reply_subject); returns their stream sequences.

        Up to ``PUBLISH_WINDOW`` publishes are in flight at once (5x faster than one
        by one); they leave in order, so stream order is task order.
        """
        seqs: list[int] = []
        for start in range(0, len(tasks), PUBLISH_WINDOW):
            acks = await asyncio.gather(
                *(
                    self.js.publish(
                        subject_name(job_id), t.model_dump_json(exclude={"reply_subject"}).encode(), stream=stream_name(job_id)
                    )
                    for t in tasks[start : start + PUBLISH_WINDOW]
                )
            )
            seqs += [ack.seq for ack in acks]
        return seqs

    async def delete_job(self, job_id: int) -> None:
        """Delete consumer, stream and dead-letter consumer (each may already be gone)."""
        await self._forget(job_id)
        for coro in (
            lambda: self.js.delete_consumer(stream_name(job_id), consumer_name(job_id)),
            lambda: self.js.delete_stream(stream_name(job_id)),
            lambda: self.js.delete_consumer(ADVISORY_STREAM, dlq_name(job_id)),
        ):
            try:
                await coro()
            except NotFoundError:
                pass

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
        )

    async def get_task(self, job_id: int, stream_seq: int) -> PipelineProcessingTask | None:
        try:
            raw = await self.js.get_msg(stream_name(job_id), stream_seq)
        except NotFoundError:
            return None
        task, _ = parse_task(raw.data or b"")
        return task

    async def dead_letters(self, job_id: int, limit: int = 256) -> list[int]:
        """Stream sequences of this job's tasks that hit max_deliver (acks the advisories read)."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        seqs: list[int] = []
        try:
            await self.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{ADVISORY_STREAM}.{dlq_name(job_id)}",
                json.dumps({"batch": limit, "no_wait": True}).encode(),
                reply=inbox,
            )
            while True:
                msg = await sub.next_msg(timeout=PULL_TIMEOUT_S)
                if _status(msg):
                    break
                try:
                    seqs.append(int(json.loads(msg.data)["stream_seq"]))
                except (ValueError, KeyError, TypeError):
                    log.warning("job %s: unreadable max-deliveries advisory %r", job_id, msg.data[:200])
                await msg.ack()
                if len(seqs) >= limit:
                    break
        except asyncio.TimeoutError:
            pass
        finally:
            await sub.unsubscribe()
        return seqs

    async def fetch(self, job_id: int, batch_size: int, timeout: float = 0.5) -> list[Msg]:
        """What Antenna's ``/tasks`` endpoint does: one JetStream fetch, ``timeout`` long.

        A pull subscription of its own per call, as Antenna's ``reserve_tasks``: two
        concurrent requests for one job must not take each other's messages, and a
        message arriving after the fetch gave up must not wait in a shared inbox for
        the next request (without a subscriber it is simply redelivered after ack_wait).
        """
        psub = await self.js.pull_subscribe_bind(durable=consumer_name(job_id), stream=stream_name(job_id))
        try:
            return await psub.fetch(batch_size, timeout=timeout)
        except asyncio.TimeoutError:
            return []
        except (NotFoundError, ServiceUnavailableError) as exc:
            # 503 "no responders": nobody serves that consumer's pull subject any more.
            if isinstance(exc, NotFoundError) or not await self.exists(job_id):
                await self._forget(job_id)
                raise StreamGone(job_id) from exc
            raise
        finally:
            await psub.unsubscribe()

    async def ack(self, reply_subject: str) -> None:
        """Antenna's ack: publish ``+ACK`` to the reply subject, then flush."""
        await self.nc.publish(reply_subject, b"+ACK")
        await self.nc.flush()

    # --- worker side ----------------------------------------------------------------

    async def reserve(self, job_id: int, n: int) -> list[Reservation]:
        """Reserve up to ``n`` tasks available right now (``no_wait`` pull; ~1 ms).

        Returns ``[]`` when nothing is available; raises :class:`StreamGone` when the
        job's stream or consumer was deleted.
        """
        if n < 1:
            return []
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            sub = self._inboxes.get(job_id)
            if sub is None:
                sub = await self.nc.subscribe(self.nc.new_inbox())
                self._inboxes[job_id] = sub
            # A late message from an earlier pull that timed out would be ours too.
            out: list[Reservation] = []
            while not sub._pending_queue.empty() and len(out) < n:  # noqa: SLF001
                msg = sub._pending_queue.get_nowait()  # noqa: SLF001
                if not _status(msg):
                    out.append(_reservation(job_id, msg))
            if len(out) >= n:
                return out
            await self.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{stream_name(job_id)}.{consumer_name(job_id)}",
                json.dumps({"batch": n - len(out), "no_wait": True}).encode(),
                reply=sub.subject,
            )
            while len(out) < n:
                try:
                    msg = await sub.next_msg(timeout=PULL_TIMEOUT_S)
                except asyncio.TimeoutError:
                    break
                status = _status(msg)
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
        sub = self._inboxes.pop(job_id, None)
        self._locks.pop(job_id, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass

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


def _status(msg: Msg) -> str | None:
    if msg.headers and "Status" in msg.headers and not msg.data:
        return msg.headers.get("Status")
    return None


def _reservation(job_id: int, msg: Msg) -> Reservation:
    task, error = parse_task(msg.data)
    return Reservation(job_id=job_id, task=task, parse_error=error, reply_subject=msg.reply, msg=msg)
