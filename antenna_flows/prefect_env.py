"""Prefect settings this project needs, applied before Prefect is imported.

Import this module before ``prefect``: Prefect reads its settings (and sets up
logging) at import time.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "antenna_flows")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # plain runs log locally
    os.environ.setdefault("PREFECT_UI_ENABLED", os.environ.get("PREFECT_UI_ENABLED", "true"))
    # The Prefect API is not the data plane: when it is down, a call to it must fail soon (the
    # worker then goes on without the record) instead of retrying for a minute or more
    # (defaults: 5 retries with exponential backoff, 60 s per request).
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")
    os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", "15")
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError:
        os.environ["PREFECT_HOME"] = str(Path.cwd() / ".prefect")


configure()
