"""Which service a command could not reach, said with its URL: Antenna, NATS or the Prefect API.

A connection error deep in a worker is an ``httpx.TransportError`` (wrapped in an
``AntennaError`` by the Antenna client) or a NATS error; the one line a user reads must
name the service and the address that failed, and what to check.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from antenna_flows.settings import AntennaSettings, is_local_url


class ServiceUnreachable(ConnectionError):
    """A service a worker needs did not answer: ``service`` ("Antenna", "NATS", "Prefect API"), its
    ``url`` and why. Raise it where the connection is given up on; the CLI prints one line of it."""

    def __init__(self, service: str, url: str | None, why: str):
        super().__init__(f"cannot reach {service} at {url} ({why})")
        self.service, self.url, self.why = service, url, why


def cannot_reach(exc: httpx.TransportError, services: dict[str, str | None]) -> str:
    """"cannot reach <service> at <URL> (<why>)": Antenna, the Prefect API, or the URL itself."""
    try:
        url = str(exc.request.url)
    except RuntimeError:  # an error raised outside a request
        url = ""
    antenna = services.get("Antenna") or _configured_antenna_url()
    why = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if antenna and (not url or _origin(url) == _origin(antenna)):
        hint = "; is `antenna-flows devstack` running?" if is_local_url(antenna) else "; check AMI_ANTENNA_API_URL"
        return f"cannot reach Antenna at {antenna} ({why}){hint}"
    prefect_url = _prefect_api_url()
    if url and (prefect_url and _origin(url) == _origin(prefect_url) or "prefect" in sys.modules):
        parts = urlsplit(url)
        where = prefect_url or f"{parts.scheme}://{parts.netloc}/api (this worker's temporary Prefect server)"
        return (f"cannot reach the Prefect API at {where} ({why}); set PREFECT_API_URL to a running Prefect "
                "server, or run with --orchestration plain")
    return f"cannot reach {url or 'the server'} ({why})"


def transport_cause(exc: BaseException) -> httpx.TransportError | None:
    """The connection error under an AntennaError (a RegistrationFailed wraps another AntennaError)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, httpx.TransportError):
            return exc
        exc, seen = exc.__cause__, seen + 1  # type: ignore[assignment]
    return None


def _configured_antenna_url() -> str | None:
    try:
        return AntennaSettings().antenna_api_url
    except ValidationError:
        return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _prefect_api_url() -> str | None:
    if "prefect" in sys.modules:
        try:
            from prefect.settings import PREFECT_API_URL

            return PREFECT_API_URL.value() or None
        except Exception:  # noqa: BLE001
            pass
    return os.environ.get("PREFECT_API_URL") or None


def is_nats_unreachable(exc: BaseException) -> bool:
    """nats-py's "no server could be reached" (raised once its connect attempts are spent)."""
    try:
        from nats.errors import NoServersError
    except ImportError:  # pragma: no cover - nats-py is a dependency
        return False
    return isinstance(exc, NoServersError)
