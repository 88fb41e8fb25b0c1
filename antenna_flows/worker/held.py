"""Held tasks: every task a worker holds, each in exactly one explicit state.

    reserved -> loading -> ready -> running -> posting -> settled
                                                          answered | released | dropped | terminated

A task enters the store when it is reserved (:meth:`TaskStore.add`, in the
state it starts in) and leaves it when it is settled (:meth:`TaskStore.settle`,
called only from :mod:`antenna_flows.worker.settle`). States change only through
:meth:`TaskStore.move`, which refuses a transition the diagram does not have.
Parts ask the store for tasks in a state; nothing keeps a task in a second
container, so "where is this task and what happens to it next" has one answer.
Every change calls ``on_change`` (the worker wakes the parts waiting on tasks).

An *answered* task is not acked by the worker: Antenna acks it after saving the
result. The store remembers recent answers (bounded) so a redelivery, which
means Antenna's save did not happen, is answered again without recomputing.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from antenna_flows.jetstream import Reservation
from antenna_flows.schemas import PipelineResultsError, PipelineResultsResponse

Result = PipelineResultsResponse | PipelineResultsError

ANSWERS_KEPT = 1024  # recent answers kept to re-post on a redelivery (older ones are recomputed instead)
ANSWERED_KEYS_KEPT = 100_000  # (job, image) pairs remembered as answered, to count recomputations


class State(enum.Enum):
    RESERVED = "reserved"  # ours, nothing started (a task without an image to load skips LOADING)
    LOADING = "loading"  # image downloading / decoding in a loader thread
    READY = "ready"  # image decoded (or failed to: the failure is its answer): a batch may take it
    RUNNING = "running"  # in the batch on a slot
    POSTING = "posting"  # answer computed, being posted to Antenna
    AWAITING_SAVE = "awaiting_save"  # redelivered while Antenna may still be saving our earlier answer (NATS)
    # settled (out of the store):
    ANSWERED = "answered"  # Antenna accepted the answer; its ack follows its save
    RELEASED = "released"  # handed back to the queue (nak with delay)
    DROPPED = "dropped"  # the job's stream vanished: nothing left to answer to
    TERMINATED = "terminated"  # Antenna accepts no answer for it: never redelivered
    SAVED = "saved"  # Antenna saved our earlier answer and acked the message: nothing left to do

    @property
    def settled(self) -> bool:
        return self in SETTLED

    @property
    def held(self) -> bool:
        """Reserved from NATS and still ours: kept alive with +WPI."""
        return not self.settled


SETTLED = frozenset({State.ANSWERED, State.RELEASED, State.DROPPED, State.TERMINATED, State.SAVED})
WAITING = (State.RESERVED, State.LOADING, State.READY)  # reserved, not started: released on stop
UNANSWERED = WAITING + (State.RUNNING, State.POSTING)  # held, no answer accepted yet: what a GPU holds
HELD = (State.RESERVED, State.LOADING, State.READY, State.RUNNING, State.POSTING,
        State.AWAITING_SAVE)  # kept alive with +WPI

# The transitions a held task may make (settling, to any settled state, is TaskStore.settle's).
# A re-answer of a redelivery enters as POSTING (its answer is kept), a malformed task naming its
# image as READY (its error result is its answer), a refused answer replaced by an error result
# stays POSTING.
MOVES = {
    State.RESERVED: {State.LOADING, State.READY, State.POSTING},  # POSTING: a re-answer of a kept answer
    State.LOADING: {State.READY},
    State.READY: {State.RUNNING},
    State.RUNNING: {State.POSTING},
    State.POSTING: {State.POSTING},
    State.AWAITING_SAVE: {State.POSTING, State.LOADING},  # the earlier answer was lost after all: answer again
}


class BadMove(AssertionError):
    """A state change the diagram does not have: a bug in a part, never an input problem."""


@dataclass(eq=False)
class HeldTask:
    """A reserved task, what the worker attached to it, and its one state."""

    r: Reservation
    state: State = State.RESERVED
    image: asyncio.Task[Any] | None = None
    twins: list[Reservation] = field(default_factory=list)  # later deliveries of the same image while held
    result: Result | None = None
    reanswer: bool = False  # a redelivery of an image this worker had answered (Antenna's save failed)
    posted_at: float | None = None  # when its answer entered the poster's outbox

    @property
    def job_id(self) -> int:
        return self.r.job_id

    @property
    def key(self) -> tuple[int, str] | None:
        return (self.r.job_id, self.r.task.image_id) if self.r.task else None

    def reservations(self) -> list[Reservation]:
        return [self.r, *self.twins]

    def reply_subjects(self) -> list[str]:
        """One reply subject per distinct message (the latest delivery of each) to answer on."""
        latest: dict[Any, Reservation] = {}
        for r in self.reservations():
            seq = r.stream_seq if r.stream_seq is not None else r.reply_subject
            if seq not in latest or r.num_delivered >= latest[seq].num_delivered:
                latest[seq] = r
        return [r.reply_subject for r in latest.values()]


class TaskStore:
    """Every held task by job, in reservation order, plus recent answers.

    Pure bookkeeping: no I/O, no clock. Parts change states through :meth:`move`;
    :mod:`settle` ends tasks with :meth:`settle`.
    """

    def __init__(self, answers_kept: int = ANSWERS_KEPT, keys_kept: int = ANSWERED_KEYS_KEPT,
                 on_change: Callable[[], None] = lambda: None):
        self._jobs: dict[int, list[HeldTask]] = {}
        self._by_key: dict[tuple[int, str], HeldTask] = {}
        self.answers: OrderedDict[tuple[int, str], Result] = OrderedDict()
        self.answered_keys: OrderedDict[tuple[int, str], None] = OrderedDict()
        self.answers_kept = answers_kept
        self.keys_kept = keys_kept
        self.on_change = on_change

    def add(self, held: HeldTask, state: State = State.RESERVED) -> None:
        """A task enters the store in the state it starts in."""
        if state.settled:
            raise BadMove(f"task {held.key} cannot enter the store settled ({state.value})")
        held.state = state
        self._jobs.setdefault(held.job_id, []).append(held)
        if held.key is not None:
            self._by_key[held.key] = held
        self.on_change()

    def find(self, key: tuple[int, str]) -> HeldTask | None:
        return self._by_key.get(key)

    def move(self, held: HeldTask, state: State) -> None:
        if state not in MOVES.get(held.state, ()):
            raise BadMove(f"task {held.key}: {held.state.value} -> {state.value} is not a move a task makes")
        held.state = state
        self.on_change()

    def settle(self, held: HeldTask, outcome: State) -> None:
        """The task ends (``outcome`` settled): out of the store; an accepted answer is remembered."""
        if not outcome.settled or held.state.settled:
            raise BadMove(f"task {held.key}: {held.state.value} -> {outcome.value} is not an ending")
        held.state = outcome
        if outcome is State.ANSWERED:
            self.remember_answer(held)
        self._remove(held)
        self.on_change()

    def _remove(self, held: HeldTask) -> None:
        queue = self._jobs.get(held.job_id)
        if queue is not None:
            try:
                queue.remove(held)
            except ValueError:
                pass
            if not queue:
                del self._jobs[held.job_id]
        if held.key is not None and self._by_key.get(held.key) is held:
            del self._by_key[held.key]

    def remember_answer(self, held: HeldTask) -> None:
        if held.key is None or held.result is None:
            return
        for memory, value, kept in ((self.answers, held.result, self.answers_kept),
                                    (self.answered_keys, None, self.keys_kept)):
            memory[held.key] = value
            memory.move_to_end(held.key)
            while len(memory) > kept:
                memory.popitem(last=False)

    def answered(self, key: tuple[int, str] | None) -> bool:
        """This worker answered the image before (its answer may no longer be kept)."""
        return key is not None and key in self.answered_keys

    def answer_of(self, key: tuple[int, str]) -> Result | None:
        """The answer this worker gave, if still kept."""
        return self.answers.get(key)

    # --- views ------------------------------------------------------------------------

    def all(self, *states: State) -> Iterator[HeldTask]:
        for queue in list(self._jobs.values()):
            for held in list(queue):
                if not states or held.state in states:
                    yield held

    def of_job(self, job_id: int, *states: State) -> list[HeldTask]:
        return [h for h in self._jobs.get(job_id, ()) if not states or h.state in states]

    def counts(self, *states: State) -> dict[int, int]:
        out: dict[int, int] = {}
        for job_id, queue in self._jobs.items():
            n = sum(1 for h in queue if h.state in states)
            if n:
                out[job_id] = n
        return out

    def waiting_counts(self) -> dict[int, int]:
        """Reserved, not started (what the reservation budget counts)."""
        return self.counts(*WAITING)

    def ready_counts(self) -> dict[int, int]:
        """Tasks a batch can take now: their image is decoded (or failed to)."""
        return self.counts(State.READY)

    def take_ready(self, job_id: int, n: int) -> list[HeldTask]:
        """The ``n`` oldest ready tasks of a job, moved to RUNNING."""
        taken = [h for h in self._jobs.get(job_id, ()) if h.state is State.READY][:n]
        for held in taken:
            self.move(held, State.RUNNING)
        return taken

    def held_count(self) -> int:
        """Tasks still ours (any state): what +WPI keeps alive and a stop must settle."""
        return len(self)

    def unanswered_count(self) -> int:
        """Tasks held with no answer accepted yet (UNANSWERED): what this worker's GPU pipeline holds."""
        return sum(self.counts(*UNANSWERED).values())

    def jobs(self) -> list[int]:
        return list(self._jobs)

    def __len__(self) -> int:
        return sum(len(q) for q in self._jobs.values())
