"""Pacing to Antenna's saves: the second scarce resource, spent as carefully as the GPU.

Antenna saves results in one FIFO queue for every job (Celery's ``ml_results``) at a rate
the fleet does not control (a few per second on a small host). A fleet answering faster
than that only lengthens the queue: a small job's results wait behind every earlier
result, and answers unsaved past ``ack_wait`` come back as redeliveries that double the
save work (the field report's feedback loop). So the fleet keeps what it has *in flight*
(tasks handed out and not yet saved: held by a worker, or answered and queued for a save)
near what Antenna saves in a few seconds plus what the GPUs hold:

    window = save_rate * (backlog_s + hold_s)

``save_rate`` is measured (saved answers per second, fleet-wide, from the jobs' own
counters), ``hold_s`` is how long this worker holds a task from reservation to an
accepted answer, ``backlog_s`` the queue of saves the fleet tolerates (it keeps
Antenna's queue from running dry while keeping a newcomer's wait short). By Little's
law the in-flight count and the save rate fix the time from reservation to saved:
``window / save_rate``. While the GPUs are the bottleneck, saves keep up, in-flight
is what the GPUs hold, and the window never binds.

Each worker sees the fleet's counters (over NATS the consumers' ``ack_pending`` and
delivered sequences; over REST the jobs' saved counts, from Antenna's job progress,
and the delivered sequence in each task's reply subject) and its own share of the
fleet's deliveries (:class:`FleetShare`, from the consumer sequence in reply subjects),
and reserves only its share of the room left in the window. No coordination, no
shared state: the same arithmetic on the same counters.

Pure logic (no I/O, injectable clock), unit-tested on a fake clock.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable


ANSWER_SHARE_WINDOW_S = 60.0
MIN_ANSWER_SHARE = 1 / 16
BOUND_HOLD_S = 10.0  # once Antenna-bound, the fleet acts so for at least this long (no flapping)
NO_READINGS_GIVE_UP_S = 30.0  # readings expected but none came since the first task: Antenna does not tell saves
RATE_WINDOW_S = 10.0  # how far back the save rate looks...
RATE_SETTLE_S = 3.0  # a save rate measured over less than this does not call the fleet Antenna-bound
RATE_READINGS = 4  # ...or over the last this many readings of the counters, whichever is longer
HOLD_SAMPLES = 64  # recent hold times kept...
HOLD_QUANTILE = 0.25  # ...of which this quantile is the pipeline's latency
LAG_CUT = 0.5  # a redelivery of an answer not yet saved: the window is cut to this fraction...
LAG_CUT_S = 30.0  # ...for this long


@dataclass
class _Job:
    delivered: int = 0  # messages handed out at least once, fleet-wide
    done: int = 0  # of those, saved (acked) or otherwise no longer pending
    read_at: float = 0.0  # when ``done`` was last read
    undelivered: int | None = None  # messages never handed out yet, as last seen (None: unknown)


class SavePacer:
    """How many more tasks this worker may take now without growing Antenna's save queue."""

    def __init__(self, *, backlog_s: float = 5.0, initial_hold_s: float = 2.0, min_backlog: float = 8.0,
                 clock: Callable[[], float] = time.monotonic, rate_window_s: float = RATE_WINDOW_S):
        self.backlog_s = backlog_s
        self.min_backlog = min_backlog  # the save queue the fleet may always keep (a post or two)
        self.clock = clock
        self.rate_window_s = rate_window_s
        self.hold_s = initial_hold_s
        self._holds: deque[float] = deque(maxlen=HOLD_SAMPLES)
        self._answered: deque[float] = deque()  # when this worker's answers were accepted
        self._saved_log: deque[tuple[float, int]] = deque()  # (t, saves) over ANSWER_SHARE_WINDOW_S
        self._jobs: dict[int, _Job] = {}
        self._saves: deque[tuple[float, int]] = deque()  # (t, saved since the previous reading)
        self._readings: deque[float] = deque(maxlen=RATE_READINGS)  # when the last readings were taken
        self._first_reading: float | None = None
        self._saving_since: float | None = None  # the reading before the first save seen
        self.unseen: Callable[[int], float] = lambda job_id: 0.0  # deliveries not read yet (REST; FleetShare)
        self.fleet_holding: Callable[[], float] = lambda: 0.0  # in flight but held unanswered by the workers
        self.gpu_holding: Callable[[], float] = lambda: math.inf  # what the fleet's GPUs need to hold, at most
        self.max_latency_s: float | None = None  # REST: at most this long from reservation to saved
        self.readings_expected = False  # readings will come (REST: from the job list), pace before the first
        self._first_take: float | None = None
        self.cold_limit = math.inf  # until a save is seen: most tasks this worker takes (what its GPU holds, x2)
        self._taken = 0  # fresh tasks this worker took
        self._saved_total = 0  # saves seen, fleet-wide, since the first reading
        self._cut_until = 0.0
        self._bound_at = -math.inf
        self._last_save_at: float | None = None

    # --- what the worker sees -------------------------------------------------------------

    def took(self, n: int) -> None:
        """This worker reserved ``n`` fresh tasks (not redeliveries)."""
        self._taken += n
        if self._first_take is None:
            self._first_take = self.clock()

    def delivered(self, job_id: int, delivered: int) -> None:
        """The highest stream sequence handed out so far (from a reply subject or the consumer)."""
        job = self._jobs.setdefault(job_id, _Job())
        job.delivered = max(job.delivered, delivered)

    def saved(self, job_id: int, done: int, delivered: int | None = None) -> None:
        """A fresh reading of a job's saved count (and, over NATS, its delivered count)."""
        now = self.clock()
        job = self._jobs.setdefault(job_id, _Job())
        if delivered is not None:
            job.delivered = max(job.delivered, delivered)
        if job.read_at and done > job.done:
            if self._saving_since is None:  # the first save seen: it happened after the previous reading
                self._saving_since = self._readings[-1] if self._readings else now
            self._saves.append((now, done - job.done))
            self._saved_log.append((now, done - job.done))
            self._saved_total += done - job.done
            self._last_save_at = now
        if self._first_reading is None:
            self._first_reading = now
        if not self._readings or now > self._readings[-1]:
            self._readings.append(now)
        job.done = max(job.done, done)
        job.read_at = now

    def undelivered(self, job_id: int, n: int) -> None:
        """What the job's queue still has to hand out (a reply subject's or the consumer's pending count)."""
        self._jobs.setdefault(job_id, _Job()).undelivered = max(0, n)

    def only_redeliveries(self, job_id: int) -> bool:
        """Everything of the job was handed out: what it still gives are redeliveries, already in flight,
        so reserving them adds nothing to the window (and a failed save must be answered again)."""
        job = self._jobs.get(job_id)
        return job is not None and job.undelivered == 0

    def forget(self, job_id: int) -> None:
        self._jobs.pop(job_id, None)

    def answered_one(self, held_s: float) -> None:
        """Antenna accepted one of this worker's answers, ``held_s`` after its reservation."""
        self._answered.append(self.clock())
        self.held_for(held_s)

    def answer_share(self) -> float | None:
        """This worker's answers over the fleet's saves in the last ``ANSWER_SHARE_WINDOW_S`` (None until
        enough saves were seen): the share that sums to one over a fleet that cannot hear itself (REST).
        At least MIN_ANSWER_SHARE, so a worker that got little is not shut out for good."""
        cutoff = self.clock() - ANSWER_SHARE_WINDOW_S
        while self._answered and self._answered[0] <= cutoff:
            self._answered.popleft()
        while self._saved_log and self._saved_log[0][0] <= cutoff:
            self._saved_log.popleft()
        saved = sum(n for _, n in self._saved_log)
        if saved < 16:
            return None
        return min(1.0, max(MIN_ANSWER_SHARE, len(self._answered) / saved))

    def held_for(self, seconds: float) -> None:
        """One task's time from reservation to an accepted answer (this worker's).

        ``hold_s`` is a low quantile of the recent ones: the pipeline's own latency (download, batch,
        post), not the time a task waited behind others in this worker. Counting that wait would let a
        worker that took more see a larger window, and take more still.
        """
        self._holds.append(max(0.0, seconds))
        ordered = sorted(self._holds)
        self.hold_s = ordered[int(HOLD_QUANTILE * (len(ordered) - 1))]

    def lag_seen(self) -> None:
        """An answer Antenna accepted came back unsaved after ``ack_wait``: save far behind, ease off."""
        self._cut_until = self.clock() + LAG_CUT_S

    # --- what it decides --------------------------------------------------------------------

    def save_rate(self) -> float | None:
        """Saved answers per second, fleet-wide: what the readings of the last ``rate_window_s`` (at
        least the last few readings, seconds apart over REST) say, measured up to the latest reading
        so a pause between readings does not read as a pause in saving. None until a save is seen."""
        if not self._readings or len(self._readings) < 2:
            return None
        last = self._readings[-1]
        start = min(last - self.rate_window_s, self._readings[0])
        while self._saves and self._saves[0][0] <= start:
            self._saves.popleft()
        if not self._saves and self._ever_saved():
            return 0.0  # Antenna saved before, and nothing since: its saves stopped (an outage)
        if not self._saves:
            return None  # nothing saved yet: no evidence of Antenna's pace either way
        # from the reading before the first save, not the first reading: before Antenna saved anything
        # (its first answers still on their way) is no evidence of its pace
        span = last - max(start, self._saving_since or self._first_reading or start)
        if span < 1.0:
            return None
        return sum(n for _, n in self._saves) / span

    def _rate_settled(self) -> bool:
        """The save rate spans at least ``RATE_SETTLE_S`` of saving."""
        if not self._readings or self._saving_since is None:
            return False
        return self._readings[-1] - self._saving_since >= RATE_SETTLE_S

    def _ever_saved(self) -> bool:
        # a save this pacer saw happen (a job that was half done when this worker started is no
        # evidence of Antenna's pace, and reading it as "saves stopped" would stall a restarted worker)
        return self._saved_total > 0

    def stalled(self, after_s: float) -> bool:
        """Something is in flight and no save was seen for ``after_s`` (since this worker started
        looking): what is in flight may be nobody's (a worker that died, answers whose saves failed),
        waiting in the queue for a redelivery that only a reservation fetches. A pacer that waited
        for room then would wait for ever; the worker probes with a small chunk instead."""
        since = self._last_save_at
        if since is None:
            starts = [t for t in (self._first_take, self._first_reading) if t is not None]
            if not starts:
                return False
            since = min(starts)
        return self.clock() - since > after_s and self.in_flight() >= 1

    def in_flight(self) -> float:
        """Tasks handed out and not yet saved, fleet-wide; saves since each reading extrapolated."""
        rate = self.save_rate() or 0.0
        now = self.clock()
        total = 0.0
        live = [j for j in self._jobs.values() if j.delivered > j.done]
        for job_id, job in self._jobs.items():
            unseen = self.unseen(job_id)
            if job.delivered + unseen <= job.done:
                continue
            since = max(0.0, now - job.read_at) if job.read_at else 0.0
            extrapolated = rate * since / max(1, len(live))  # the fleet's save rate, shared by the jobs in flight
            total += max(0.0, job.delivered + unseen - job.done - extrapolated)
        return total

    def window(self) -> float:
        """The fleet's in-flight budget: a few seconds of saves queued (at least ``min_backlog``) plus what
        the GPUs hold while the queue drains; infinite until a save rate is known (see :meth:`allowance`)."""
        rate = self.save_rate()
        if rate is None:
            return math.inf
        window = self._queue_allowed(rate) + self._holding(rate, needed=True)
        if self.max_latency_s is not None:  # REST: from reservation to saved well inside ack_wait
            window = min(window, max(self.min_backlog, rate * self.max_latency_s))
        return window

    def _queue_allowed(self, rate: float) -> float:
        """Answers the fleet may keep queued for Antenna's save: ``backlog_s`` of saves, at least ``min_backlog``."""
        allowed = max(self.min_backlog, rate * self.backlog_s)
        return allowed * LAG_CUT if self._eased_off() else allowed

    def _eased_off(self) -> bool:
        """Within ``LAG_CUT_S`` of a late save (:meth:`lag_seen`): the queue allowed is cut to ``LAG_CUT``."""
        return self.clock() < self._cut_until

    def _holding(self, rate: float, *, needed: bool = False) -> float:
        """What the GPUs hold (in flight, not queued for a save): the pipeline's latency at the save rate, or
        what the workers say they hold unanswered, whichever is more. ``needed``: what the window grants for
        it, at most what the GPUs need (prefetched, running, posting), so holding more buys no more room."""
        held = self.fleet_holding()
        if needed:
            held = min(held, self.gpu_holding())
        return max(rate * self.hold_s, held)

    def bound(self) -> bool:
        """Antenna's saves, not the GPUs, set the pace: answers queued for a save reached half of what the
        fleet may queue (half of ``backlog_s`` of saves), within the last ``BOUND_HOLD_S`` (GPU-bound, saves
        keep up: in flight is what the GPUs hold, and nothing queues but estimation noise)."""
        rate = self.save_rate()
        if rate is None or not self._rate_settled():
            return False  # a rate from the first second of saves is noise: it must not pace a GPU-bound fleet
        now = self.clock()
        if self.backlog() >= 0.5 * self._queue_allowed(rate):
            self._bound_at = now
        return now - self._bound_at < BOUND_HOLD_S

    def cold(self) -> bool:
        """No save rate yet: the worker's readings should come often."""
        return self.save_rate() is None

    def allowance(self, share: float, floor: int = 0) -> float:
        """Tasks this worker may reserve now: its share of the room left in the window (at least ``floor``
        while the fleet has nothing in flight, so a window computed from no saves never stalls it)."""
        if self.save_rate() is None:
            if not self._readings and (not self.readings_expected or (
                    self._first_take is not None and self.clock() - self._first_take > NO_READINGS_GIVE_UP_S)):
                return math.inf  # nothing tells this worker what Antenna saves: it cannot pace
            # Antenna's pace is not known yet: each worker keeps at most what its own GPU holds
            # unsaved, counting its share of the saves seen so far as its own; so a fleet far
            # faster than Antenna's saves does not flood its queue before the first rate, and one
            # whose answers are saved at once is not held back.
            mine = self._taken - share * self._saved_total
            if self._readings:
                # at most what the fleet has in flight: what it took may have been saved before its first
                # reading (saves no reading counted), and a GPU that waited for the next reading idles
                mine = min(mine, self.in_flight())
            return max(0.0, self.cold_limit - mine)
        window = self.window()
        flight = self.in_flight()
        room = max(0.0, window - flight) * share
        if flight < 1:
            room = max(room, float(floor))
        return room

    def backlog(self) -> float:
        """Estimated answers queued for a save: in flight beyond what the GPUs hold, which is the larger of the
        pipeline's latency at the save rate and what the workers hold unanswered (tasks waiting in a worker's
        pool are not in Antenna's queue: counting them read a GPU-bound fleet as Antenna-bound)."""
        rate = self.save_rate() or 0.0
        return max(0.0, self.in_flight() - self._holding(rate))

    def describe(self, share: float) -> str:
        """One line for the worker's log: what the pacer sees and decides."""
        rate = self.save_rate()
        if rate is None:
            return "pacing: no save measured yet (reserving at the GPU's pace)"
        window = self.window()
        flight = self.in_flight()
        return (f"pacing: Antenna saves {rate:.1f}/s, fleet in flight {flight:.0f} of a window of {window:.0f} "
                f"(queued for a save ~{self.backlog():.0f}, {self.save_delay_s():.1f}s), hold {self.hold_s:.1f}s, "
                f"share {share:.2f} (fleet of ~{1 / share:.1f}), room for {self.allowance(share):.0f}"
                + (", eased off after a late save" if self._eased_off() else ""))

    def post_wait_s(self) -> float:
        """How long an answer posted now waits for its save, for the poster's batching: the estimate, and
        while Antenna-bound at least the queue the fleet keeps on purpose (``backlog_s`` of saves): the
        estimate counts what the workers hold as not queued, so it reads short while posts crowd
        Antenna's web workers that its saves need."""
        delay = self.save_delay_s()
        if self.bound():
            delay = max(delay, self.backlog_s * (LAG_CUT if self._eased_off() else 1.0))
        return delay

    def save_delay_s(self) -> float:
        """How long an answer posted now would wait for its save (backlog over save rate); 0 when Antenna
        saves nothing at all (its saves fail: answers are lost, not late)."""
        backlog = self.backlog()
        rate = self.save_rate() or 0.0
        if backlog < 1 or rate <= 0:
            return 0.0
        return backlog / rate
