"""The Antenna side of the job streams: what Antenna's server does with JetStream.

Create a job's stream, consumer and dead-letter consumer; publish its tasks; serve
``/tasks`` with one fetch (0.5 s, as Antenna); ack after a save; read dead letters;
delete everything when the job ends. The worker's side (bind, reserve, +WPI, stats)
is :mod:`antenna_flows.jetstream`, which this extends.
"""

from __future__ import annotations

import asyncio
import json
import logging

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError, ServiceUnavailableError

from antenna_flows.jetstream import (
    ADVISORY_MAX_AGE_S,
    ADVISORY_STREAM,
    ADVISORY_SUBJECTS,
    PULL_TIMEOUT_S,
    STREAM_MAX_AGE_S,
    JobQueue,
    StreamGone,
    consumer_name,
    dlq_name,
    is_status,
    max_deliveries_subject,
    parse_task,
    stream_name,
    subject_name,
)
from antenna_flows.schemas import PipelineProcessingTask

log = logging.getLogger(__name__)

PUBLISH_WINDOW = 256  # task publishes awaiting their JetStream ack at once


class JobStreams(JobQueue):
    """Antenna's job streams on one NATS connection: the worker's view plus what only Antenna does."""

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
        """Publish task bodies (``"reply_subject": null``, as Antenna's); returns their stream sequences.

        Up to ``PUBLISH_WINDOW`` publishes are in flight at once (5x faster than one
        by one); they leave in order, so stream order is task order.
        """
        seqs: list[int] = []
        for start in range(0, len(tasks), PUBLISH_WINDOW):
            acks = await asyncio.gather(
                *(
                    self.js.publish(
                        subject_name(job_id), t.model_copy(update={"reply_subject": None}).model_dump_json().encode(), stream=stream_name(job_id)
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
                if is_status(msg):
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
