"""A worker's units of work (reservation rounds, result posts), recorded by Prefect a window at a time.

A task run per reservation round and per batch post made Prefect's record grow with the images
(~7 KB of database per image at 70 images/s: ~40 GB per GPU-day). Here a task run is a *window*
of work instead: the ``serve-window`` task (``tasks/serve_window.py``) takes every unit the worker
hands over for up to ``window_s`` seconds, runs each at once and concurrently, each with its own
retries (:func:`~antenna_flows.orchestration.retry.retry`: outages only), and returns what
happened: units, counts per job, retries taken, failures, in its Completed state's message
(visible in the UI) and data. The record then grows with time, not images: at most one task run
per ``window_s`` of steady work (30 s by default), none while idle.

The task run takes data only (worker name, window number, length): the worker's live units come
from :data:`WINDOWS`, a registry by worker name, as the session subflow's body comes from
:data:`~antenna_flows.orchestration.prefect.SESSIONS`.

Prefect is not the data plane: a unit no window has taken within ``start_grace_s`` (Prefect slow
or down) is run plainly by the caller, with the same retries, and one warning line; a window that
cannot start hands its units back the same way.

Pure asyncio, no Prefect import: how a window is opened is the caller's (``open_window``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from antenna_flows.orchestration.retry import retry

log = logging.getLogger(__name__)

# A task run costs ~20 KB of Prefect database (row, 3 states, 3 events and their resources; measured
# on SQLite): 30 s windows are ~2,900 a GPU-day, ~58 MB; 10 s windows would be ~175 MB.
WINDOW_S = 30.0
START_GRACE_S = 2.0  # a unit no window has taken by then runs plainly
PLAIN_FOR_S = 30.0  # ... and so do the units after it for this long, then windows are tried again
_LABEL_JOB = re.compile(r"job (\d+) x(\d+)")


@dataclass
class Unit:
    """One unit of work: ``fn`` is called (and retried on outages) by whoever takes it first."""

    kind: str  # "reserve" | "post"
    fn: Callable[[], Awaitable[Any]]
    delays: list[float]
    label: str
    jobs: dict[int, int]  # reserve: tasks wanted per job; post: results per job
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    taken: bool = False

    async def run(self) -> tuple[Any, int]:
        """Call it with its retries: (result, retries taken); raises after the last."""
        return await retry(self.fn, self.delays, self.label)


@dataclass
class Tally:
    """What a window did (returned by the task run)."""

    units: int = 0
    reservations: int = 0
    reserved: int = 0
    posts: int = 0
    posted: int = 0
    retries: int = 0
    failed: int = 0
    jobs: dict[int, dict[str, int]] = field(default_factory=dict)

    def add(self, unit: Unit, result: Any, retries: int, failed: bool) -> None:
        self.units += 1
        self.retries += retries
        self.failed += int(failed)
        if unit.kind == "reserve":
            self.reservations += 1
            self.reserved += int(result or 0) if not failed else 0
            for job, n in unit.jobs.items():
                self.jobs.setdefault(job, {}).setdefault("asked", 0)
                self.jobs[job]["asked"] += n
        else:
            self.posts += 1
            for job, n in unit.jobs.items():
                row = self.jobs.setdefault(job, {})
                key = "post_failed" if failed else "posted"
                row[key] = row.get(key, 0) + n
                if not failed:
                    self.posted += n

    def summary(self, number: int, seconds: float) -> dict[str, Any]:
        return {
            "window": number, "seconds": round(seconds, 3), "units": self.units,
            "reservations": self.reservations, "reserved": self.reserved,
            "posts": self.posts, "posted": self.posted, "retries": self.retries, "failed": self.failed,
            "jobs": {str(j): row for j, row in sorted(self.jobs.items())},
        }

    def message(self) -> str:
        jobs = ", ".join(
            f"job {j}: " + " ".join(f"{k} {v}" for k, v in row.items()) for j, row in sorted(self.jobs.items())
        )
        return (f"{self.reservations} reservation rounds ({self.reserved} tasks), {self.posts} posts "
                f"({self.posted} results), {self.retries} retries, {self.failed} failed; {jobs}")[:1500]


def jobs_of_label(label: str) -> dict[int, int]:
    """``post job 1 x4, job 2 x3`` -> {1: 4, 2: 3} (the worker's label for a batch's post)."""
    return {int(j): int(n) for j, n in _LABEL_JOB.findall(label)}


class Windows:
    """One worker's units waiting for a window, the window that takes them, and the plain fallback."""

    def __init__(self, worker: str, window_s: float = WINDOW_S, start_grace_s: float = START_GRACE_S,
                 open_window: Callable[[int], Awaitable[Any]] | None = None,
                 context: contextvars.Context | None = None):
        self.worker = worker
        self.window_s = window_s
        self.start_grace_s = start_grace_s
        self.pending: deque[Unit] = deque()  # units no one has taken yet
        self._arrived = asyncio.Event()
        self.open_window = open_window
        self.context = context  # windows are task runs of the worker's flow run, whoever's unit opens them
        self.accepting: int | None = None  # the window taking units now
        self.closed = False
        self.opened = 0  # windows opened so far (the last one's number)
        self.plain_units = 0
        self.plain_until = 0.0  # after a window failed or came late: units run plainly until then
        self._open: set[asyncio.Task[Any]] = set()
        self._warned = False

    # --- the worker's side ---------------------------------------------------------------

    async def submit(self, kind: str, fn: Callable[[], Awaitable[Any]], delays: list[float], label: str,
                     jobs: dict[int, int]) -> Any:
        unit = Unit(kind, fn, delays, label, jobs)
        if time.monotonic() < self.plain_until:  # windows failed a moment ago: do not wait on them
            unit.taken = True
            self.plain_units += 1
            return (await unit.run())[0]
        self.pending.append(unit)
        self._arrived.set()
        self._ensure_window()
        try:
            return await asyncio.wait_for(asyncio.shield(unit.future), self.start_grace_s)
        except asyncio.TimeoutError:
            if unit.taken:
                return await unit.future
        unit.taken = True  # no window took it in time: Prefect is slow or down, the work is not
        self._warn(f"no window took {unit.label!r} within {self.start_grace_s:g}s")
        self.plain_until = time.monotonic() + PLAIN_FOR_S
        self.plain_units += 1
        return (await unit.run())[0]

    def _ensure_window(self) -> None:
        if self.open_window is None or self.accepting is not None or self.closed:
            return
        self.opened += 1
        number = self.opened
        self.accepting = number  # claimed at once, so concurrent units do not open a window each
        window = asyncio.get_running_loop().create_task(
            self._window(number), name=f"{self.worker}-window-{number}", context=self.context)
        self._open.add(window)
        window.add_done_callback(self._open.discard)

    async def _window(self, number: int) -> None:
        assert self.open_window is not None
        try:
            await self.open_window(number)
        except Exception as exc:  # noqa: BLE001 - the record failed, not the work
            self._warn(f"window {number} failed: {exc!r}")
            self.plain_until = time.monotonic() + PLAIN_FOR_S
        finally:
            if self.accepting == number:
                self.accepting = None
            if self._untaken():
                self._ensure_window()

    def _untaken(self) -> bool:
        while self.pending and self.pending[0].taken:
            self.pending.popleft()
        return bool(self.pending)

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("worker %s: Prefect record unavailable (%s): running units of work without it "
                        "(said once; the record resumes when Prefect answers)", self.worker, why)

    async def close(self, timeout_s: float = 15.0) -> None:
        """Open no new window; let open ones finish their units (each ends its task run)."""
        self.closed = True
        self.accepting = None
        self._arrived.set()  # wake the open window: it stops taking units
        if self._open:
            await asyncio.wait(set(self._open), timeout=timeout_s)
            for window in self._open:
                window.cancel()

    # --- the window's side (inside the task run) -----------------------------------------

    async def serve(self, number: int, seconds: float) -> tuple[dict[str, Any], str]:
        """Take units for ``seconds``, run each at once; wait for those taken; return (summary, message)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + seconds
        tally = Tally()
        running: set[asyncio.Task[Any]] = set()
        try:
            while self.accepting == number:
                if self.pending:
                    unit = self.pending.popleft()
                    if unit.taken:
                        continue
                    unit.taken = True
                    run = asyncio.create_task(self._run(unit, tally))
                    running.add(run)
                    run.add_done_callback(running.discard)
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
        finally:
            if self.accepting == number:
                self.accepting = None
            if self._untaken():
                self._ensure_window()  # units that came as this window closed open the next
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        return tally.summary(number, loop.time() - started), tally.message()

    async def _run(self, unit: Unit, tally: Tally) -> None:
        try:
            result, retries = await unit.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the worker, which settles it
            tally.add(unit, None, getattr(exc, "retries_taken", 0), failed=True)
            if not unit.future.done():
                unit.future.set_exception(exc)
            return
        tally.add(unit, result, retries, failed=False)
        if not unit.future.done():
            unit.future.set_result(result)


# The windows of every worker of this process, by worker name (the serve-window task looks its own up).
WINDOWS: dict[str, Windows] = {}
