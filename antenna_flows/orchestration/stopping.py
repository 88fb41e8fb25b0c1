"""How a worker flow run stops: SIGTERM and cancels end it gracefully, never Crashed.

Prefect's flow engine turns SIGTERM into ``TerminationSignal`` (a crash mid-batch). While a worker
flow runs, SIGTERM instead calls the worker's graceful stop: the batch in flight is finished and
posted, the rest released; the run ends Completed, or Cancelled when the runner says the SIGTERM is
a cancel from the UI (:func:`cancel_requested`).

:data:`STOPPERS` is the process's registry of running workers (a signal handler has no other way to
find them); it lives here, imported once by name, never in a flow file Prefect may load twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any, Callable, Iterator

CANCEL_READ_TIMEOUT_S = 10.0  # reading the run's state to tell a cancel from a plain SIGTERM

# Every worker running in this process, by name: (its event loop, its graceful stop).
STOPPERS: dict[str, tuple[asyncio.AbstractEventLoop, Callable[[str], None]]] = {}


def on_sigterm(signum: int, frame: Any) -> None:
    """Stop every worker of this process gracefully (runs in the main thread, between bytecodes)."""
    reason = "SIGTERM (cancel requested)" if cancel_intent() else "SIGTERM"
    for loop, stop in list(STOPPERS.values()):
        try:
            loop.call_soon_threadsafe(stop, reason)
        except RuntimeError:  # that worker's loop is closed: nothing left to stop
            pass


@contextlib.contextmanager
def stops_on_sigterm(worker: str, stop: Callable[[str], None]) -> Iterator[None]:
    """While the body runs (the worker flow's lifetime, on its event loop), SIGTERM calls ``stop``."""
    STOPPERS[worker] = (asyncio.get_running_loop(), stop)
    take_over_sigterm()
    try:
        with graceful_sigterm():
            yield
    finally:
        STOPPERS.pop(worker, None)


@contextlib.contextmanager
def graceful_sigterm() -> Iterator[None]:
    """For the worker flow's lifetime, Prefect's SIGTERM bridge *is* the graceful stop.

    Every subflow's engine re-installs ``prefect.utilities.engine._prefect_sigterm_handler``
    when it starts (``capture_sigterm``, looked up by name), some milliseconds before the
    session body can call :func:`take_over_sigterm`: a SIGTERM landing there would still raise
    ``TerminationSignal`` into whatever the event loop was doing. Pointing that name at the
    graceful stop closes the gap. Prefect is pinned (3.9.1); if the name is gone, the
    per-subflow take-over still covers all but those milliseconds.
    """
    import prefect.utilities.engine as engine

    original = getattr(engine, "_prefect_sigterm_handler", None)
    patched = original is not None and original is not on_sigterm
    if patched:
        engine._prefect_sigterm_handler = on_sigterm  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if patched:
            engine._prefect_sigterm_handler = original  # type: ignore[attr-defined]


def take_over_sigterm() -> None:
    """Make SIGTERM stop the worker instead of raising Prefect's ``TerminationSignal``.

    Prefect's flow engine installs a handler raising ``TerminationSignal``
    (``prefect.utilities.engine.capture_sigterm``) when a flow run starts, and every subflow
    re-installs it if someone replaced it: the worker's own handler is then pre-empted and the
    run Crashes mid-batch. Called first thing in the worker flow and in each session subflow,
    this puts the graceful stop back; the engine restores it when a subflow ends.
    """
    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: the worker's loop handler (if any) is all there is
        pass


try:  # the runner's control channel (Prefect 3.9): "cancel" before it SIGTERMs a run cancelled in the UI
    from prefect._internal.control_listener import get_intent as _get_intent
except Exception:  # noqa: BLE001 - private API: absent means no intent (the API state is read instead)
    _get_intent = None


def cancel_intent() -> bool:
    """Did the runner say this SIGTERM is a cancel from the UI/API?"""
    try:
        return _get_intent is not None and _get_intent() == "cancel"
    except Exception:  # noqa: BLE001
        return False


async def cancel_requested(flow_run_id: Any) -> bool:
    """Was the SIGTERM that stopped this run a cancel (the runner said so, or the run is Cancelling)?"""
    if cancel_intent():
        return True
    try:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            run = await asyncio.wait_for(client.read_flow_run(flow_run_id), CANCEL_READ_TIMEOUT_S)
        return bool(run.state and (run.state.is_cancelling() or run.state.is_cancelled()))
    except Exception:  # noqa: BLE001
        return False
