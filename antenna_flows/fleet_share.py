"""This worker's share of the fleet: how much of the room Antenna's saves leave is its to take.

No coordination and no shared state: over NATS the workers answer a roll call (the share is
exact, and each says what it holds unanswered, so every worker reads the same fleet); over REST they cannot hear each other, and the share is read from the consumer
sequences in the reply subjects of this worker's own reservations (its deliveries against the
fleet's). Pure logic (no I/O, injectable clock), unit-tested on a fake clock; the pacer
(:mod:`antenna_flows.pacing`) multiplies its room by this share.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable

SHARE_WINDOW_S = 300.0  # how far back the fleet share looks (long: a worker waiting for room must not
# read its own waiting as a smaller share, which would make it wait longer still)
PEER_TTL_S = 10.0  # a worker not heard from for this long has gone (roll calls every ROLL_CALL_S)
ROLL_CALL_S = 1.0  # a core NATS publish: costs Antenna nothing
TAIL_CAP_S = 30.0  # longest unseen stretch of a job's deliveries extrapolated (REST)


class FleetShare:
    """This worker's share of the fleet: 1 / the workers serving its pipelines.

    Over NATS the workers say who they are, and what they hold, on a roll-call subject every
    ``ROLL_CALL_S`` (:meth:`peer`): the share is exact. Over REST they cannot hear each other, and the share is
    read from the deliveries, as below, and frozen while the worker is paced (:meth:`paced`): a
    worker waiting for room must not read its own waiting as a smaller share, which would make it
    wait longer still while the others take everything.

    From deliveries: this worker's share of the fleet's, from JetStream's consumer delivery sequences.

    Every delivery advances its consumer's delivery sequence, whoever takes it. The fleet's
    deliveries of a job between two readings of that sequence (the consumer's own counter over
    NATS, :meth:`consumer`; the sequence in the reply subjects of this worker's own reservations
    over REST, :meth:`observe`) are spread evenly over the time between the readings; ``share``
    is this worker's deliveries over the fleet's in the last ``window_s``, ``fleet_size`` its
    inverse (workers at this worker's pace). Spreading matters: a job this worker reserved from
    twice, a minute apart, says what the fleet took in that minute, not in the last 30 s; and since
    its last reading (REST) the fleet is assumed to go on at that interval's pace while the job had
    tasks left. A worker that has seen too little keeps its last estimate (1.0 at first).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = SHARE_WINDOW_S):
        self.clock = clock
        self.window_s = window_s
        self._last: dict[int, tuple[float, int]] = {}  # job -> (when, delivery sequence) last read
        self._rate: dict[int, tuple[float, float]] = {}  # job -> (fleet deliveries/s, seconds) of its last interval
        self._draining: set[int] = set()  # jobs whose queue had nothing left to hand out at the last reading
        self._peers: dict[str, float] = {}  # worker -> when it last said it serves our pipelines (NATS)
        self._holding: dict[str, int] = {}  # worker -> what it last said it holds unanswered (NATS)
        self._paced = False
        self._read_by_consumer: set[int] = set()  # jobs whose consumer counter is read (exact)
        self._own: deque[tuple[float, int]] = deque()  # (t, deliveries to this worker)
        self._fleet: deque[tuple[float, float, int]] = deque()  # (from, to, deliveries to anyone)
        self._last_share = 1.0

    def _reading(self, job_id: int, seq: int, now: float) -> None:
        last = self._last.get(job_id)
        if last is not None and seq > last[1]:
            self._fleet.append((last[0], now, seq - last[1]))
            if now > last[0]:
                self._rate[job_id] = ((seq - last[1]) / (now - last[0]), now - last[0])
        if last is None or seq >= last[1]:
            self._last[job_id] = (now, seq)

    def peer(self, worker: str, holding: int | None = None) -> None:
        """A worker serving this worker's pipelines said it is there (itself included), and what it holds."""
        self._peers[worker] = self.clock()
        if holding is None:
            self._holding.pop(worker, None)
        else:
            self._holding[worker] = holding

    def peers(self) -> int:
        """Workers heard from within ``PEER_TTL_S`` (0: no roll call, as over REST)."""
        cutoff = self.clock() - PEER_TTL_S
        for worker in [w for w, t in self._peers.items() if t < cutoff]:
            del self._peers[worker]
            self._holding.pop(worker, None)
        return len(self._peers)

    def others_holding(self, me: str) -> float | None:
        """What the other workers said they hold unanswered at their last roll call; None unless every one
        of them said it (over REST, or a peer that does not tell)."""
        self.peers()  # forget the gone
        others = [w for w in self._peers if w != me]
        if any(w not in self._holding for w in others):
            return None
        return float(sum(self._holding[w] for w in others))

    def paced(self, paced: bool) -> None:
        """While paced the delivery-based estimate stands still."""
        self._paced = paced

    def consumer(self, job_id: int, delivery_seq: int) -> None:
        """The job consumer's delivery sequence, read from JetStream (all deliveries, all workers)."""
        self._read_by_consumer.add(job_id)
        self._reading(job_id, delivery_seq, self.clock())

    def observe(self, job_id: int, consumer_seqs: Iterable[int], pending: int | None = None) -> None:
        """The delivery sequences in the reply subjects of one of this worker's reservations (and the
        job's pending count in the last of them)."""
        seqs = sorted(s for s in consumer_seqs if s > 0)
        if not seqs:
            return
        now = self.clock()
        self._own.append((now, len(seqs)))
        if pending == 0:
            self._draining.add(job_id)
        elif pending is not None:
            self._draining.discard(job_id)
        if job_id not in self._read_by_consumer:
            self._reading(job_id, seqs[-1], now)

    def forget(self, job_id: int) -> None:
        self._last.pop(job_id, None)
        self._rate.pop(job_id, None)
        self._draining.discard(job_id)
        self._read_by_consumer.discard(job_id)

    def unseen(self, job_id: int) -> float:
        """Deliveries of the job the fleet probably made since this worker last read its sequence
        (REST: reply subjects), at its last interval's pace, while it had tasks left (capped)."""
        if job_id in self._read_by_consumer or job_id in self._draining or job_id not in self._rate:
            return 0.0
        t, _ = self._last[job_id]
        rate, gap = self._rate[job_id]
        return rate * max(0.0, min(self.clock() - t, 2 * gap, TAIL_CAP_S))

    def share(self) -> float:
        peers = self.peers()
        if peers:
            return 1.0 / peers
        if self._paced:
            return self._last_share
        now = self.clock()
        start = now - self.window_s
        while self._own and self._own[0][0] <= start:
            self._own.popleft()
        while self._fleet and self._fleet[0][1] < start:
            self._fleet.popleft()
        own = sum(n for _, n in self._own)
        fleet = 0.0
        for t0, t1, n in self._fleet:
            span = t1 - t0
            fleet += n if span <= 0 else n * max(0.0, t1 - max(t0, start)) / span
        # Since the last reading of a job read from reply subjects (REST), the fleet went on taking
        # from it unseen: at the pace of its last interval, while it had anything left to hand out.
        for job_id, (t, _) in self._last.items():
            if job_id in self._read_by_consumer or job_id in self._draining or job_id not in self._rate:
                continue
            rate, gap = self._rate[job_id]
            tail = min(now - max(t, start), 2 * gap, TAIL_CAP_S)  # no further than readings usually are apart
            fleet += rate * max(0.0, tail)
        fleet = max(fleet, float(own))
        if fleet >= 8 and own >= 2:  # enough deliveries, some of them ours, to say something
            self._last_share = min(1.0, max(0.01, own / fleet))
        return self._last_share

    def fleet_size(self) -> float:
        return 1.0 / self.share()
