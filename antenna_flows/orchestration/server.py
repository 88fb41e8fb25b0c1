"""The Prefect API a worker process reports to: the configured one, else a temporary server of its own.

With ``PREFECT_API_URL`` set, runs report there. Without it, Prefect starts a temporary server on
first use, in a child process of the worker's process group: a SIGTERM sent to the group (a
supervisor, ``timeout``, SLURM's ``scancel``) stopped that server at once, before the worker's
final report, which then failed; the run stayed "Running" and the process exited 1.
:func:`prefect_api` starts that temporary server itself, before the flow run and in a process group
of its own (group signals do not reach it; on Linux it still dies with the worker), registers it as
the server Prefect's clients use when no URL is set, and stops it after the flow run has returned.

A Prefect API that cannot be reached surfaces from Prefect's engine as ``RuntimeError("Failed to
reach API at ...")``; :func:`prefect_api` turns it into ``ServiceUnreachable`` (one line naming the
Prefect API and its URL, as every "cannot reach" of the product: ``antenna_flows.unreachable``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from typing import Any, Iterator
from urllib.parse import urlsplit

import antenna_flows.prefect_env  # noqa: F401 - before prefect
import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

from antenna_flows.unreachable import ServiceUnreachable, transport_cause
from antenna_flows.worker import FatalWorkerError

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120  # a cold start migrates a fresh SQLite database (seconds on a loaded host)

# Runs uvicorn as ``python -m uvicorn`` would, after asking the kernel to SIGTERM it when its parent
# dies (PR_SET_PDEATHSIG): in a process group of its own it would otherwise outlive a killed worker.
_LAUNCH = """\
import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
except (AttributeError, OSError):
    pass
if os.getppid() != parent:
    sys.exit(0)
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


class PrefectServerFailed(FatalWorkerError):
    """The temporary Prefect server could not start (the worker cannot record its runs)."""



class DetachedPrefectServer(SubprocessASGIServer):
    """Prefect's temporary server, in a process group of its own, dying with this process."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        return subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(os.getpid()),
             "--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env,
            process_group=0,
        )


@contextlib.contextmanager
def prefect_api(startup_timeout_s: int = STARTUP_TIMEOUT_S) -> Iterator[str | None]:
    """The Prefect API URL for flow runs inside the block (``None``: none, and Prefect says so itself).

    No ``PREFECT_API_URL`` (and Prefect's temporary servers allowed): a temporary server that
    outlives the flow run, stopped when the block ends. A connection error to that API escaping the
    block becomes ``ServiceUnreachable("the Prefect API", url, why)``.
    """
    configured = PREFECT_API_URL.value()
    server: DetachedPrefectServer | None = None
    if not configured and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        server = _new_server()
        try:
            server.start(timeout=startup_timeout_s)
        except Exception as exc:
            server.stop()
            _forget(server)
            raise PrefectServerFailed(f"cannot start a temporary Prefect server ({exc}); set PREFECT_API_URL to a "
                                      "running Prefect server, or run with --orchestration plain") from exc
        log.info("no PREFECT_API_URL: runs are recorded by a temporary Prefect server at %s "
                 "(stopped when the worker has stopped)", server.api_url)
    url = configured or (server.api_url if server else None)
    try:
        yield url
    except Exception as exc:
        cause = transport_cause(exc)
        if url and cause is not None and _same_origin(cause, url):
            where = url if configured else f"{url} (this worker's temporary Prefect server)"
            raise ServiceUnreachable("the Prefect API", where, f"{type(cause).__name__}: {cause}; set PREFECT_API_URL "
                                     "to a running Prefect server, or run with --orchestration plain") from exc
        raise
    finally:
        if server is not None:
            server.stop()
            _forget(server)


def _new_server() -> DetachedPrefectServer:
    """A server on a free port, registered as the one Prefect's clients use when no URL is set."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = DetachedPrefectServer(port=port)
    SubprocessASGIServer._instances[None] = server
    return server


def _forget(server: SubprocessASGIServer) -> None:
    if SubprocessASGIServer._instances.get(None) is server:
        SubprocessASGIServer._instances.pop(None, None)


def _same_origin(exc: Exception, api_url: str) -> bool:
    """Was the failed request for the Prefect API at ``api_url``?"""
    try:
        failed = urlsplit(str(exc.request.url))  # type: ignore[attr-defined]
    except RuntimeError:  # no request attached
        return False
    api = urlsplit(api_url)
    return (failed.hostname, failed.port) == (api.hostname, api.port)
