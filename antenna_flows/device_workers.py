"""One worker process per device, started and stopped together by one command.

``antenna-flows worker --devices all`` runs the same ``worker`` command once per device as a
child process (``--devices <device> --device <device> --worker-name <name>-<device>``), so a
service manager (supervisord, systemd, SLURM) sees one program per host, as with upstream's
``ami worker``. The parent:

- forwards SIGTERM and SIGINT to every child (each finishes its batch in flight, posts it,
  releases the rest and exits 0); children run in sessions of their own so a terminal's
  Ctrl-C reaches them once, through the parent;
- asks the kernel to SIGTERM each child if the parent itself dies (``PR_SET_PDEATHSIG``), so a
  SIGKILLed parent leaves no orphan holding reservations;
- when one child exits non-zero before any stop was asked for, stops the others (as
  upstream's ``torch.multiprocessing.spawn`` does) and exits with that child's code, so the
  service manager restarts the whole set; exits 0 when every child stopped cleanly.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

log = logging.getLogger(__name__)

POLL_S = 0.2
PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    device: str
    name: str
    proc: subprocess.Popen[bytes]
    code: int | None = None


@dataclass
class DeviceWorkers:
    """The children of one ``worker --devices`` command."""

    argv: Sequence[str]  # the command's own arguments (after ``antenna-flows``)
    devices: list[str]
    names: list[str]
    children: list[Child] = field(default_factory=list)
    stop_signal: int | None = None  # the signal that asked everyone to stop
    failed: Child | None = None  # the first child that exited non-zero on its own

    def child_command(self, device: str, name: str) -> list[str]:
        """The parent's own command line, pinned to one device (the last of a repeated option wins)."""
        return [sys.executable, "-m", "antenna_flows.cli", *self.argv,
                "--devices", device, "--device", device, "--worker-name", name, "--no-register"]

    def start(self) -> None:
        for device, name in zip(self.devices, self.names):
            proc = subprocess.Popen(self.child_command(device, name), start_new_session=True, preexec_fn=_die_with_parent)
            self.children.append(Child(device, name, proc))
            log.info("worker %s on %s: pid %d", name, device, proc.pid)

    def signal_all(self, signum: int) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                try:
                    child.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            log.info("%s: stopping %d worker(s)", signal.Signals(signum).name, len(self.children))
        self.stop_signal = signum
        self.signal_all(signum)

    def run(self) -> int:
        """Start the children, supervise them until all have exited; the command's exit status."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while any(c.code is None for c in self.children):
                for child in self.children:
                    if child.code is None and (code := child.proc.poll()) is not None:
                        self._exited(child, code)
                time.sleep(POLL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.signal_all(signal.SIGTERM)  # only reached with children alive on an exception
        return self.exit_status()

    def _exited(self, child: Child, code: int) -> None:
        child.code = code
        if code == 0:
            log.info("worker %s on %s exited 0", child.name, child.device)
            return
        log.error("worker %s on %s exited with %s", child.name, child.device, _describe(code))
        if self.failed is None and self.stop_signal is None:
            self.failed = child
            alive = [c.name for c in self.children if c.proc.poll() is None]
            if alive:
                log.error("stopping the other workers (%s) so the whole set restarts together", ", ".join(alive))
                self.signal_all(signal.SIGTERM)

    def exit_status(self) -> int:
        """0 when every child exited 0; else the first failure's code (128+N for a child killed by signal N)."""
        failed = self.failed or next((c for c in self.children if c.code), None)
        if failed is None or failed.code is None:
            return 0
        return 128 - failed.code if failed.code < 0 else failed.code


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM me if my parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
