"""The fair worker, one module per part (see :mod:`antenna_flows.worker.core` for how they fit).

- ``core``: :class:`FairWorker`: builds the parts, watches them, the stop order;
- ``held``: the held-task store, each task in one explicit state;
- ``settle``: how a task ends (the only place), and what a post's outcome means;
- ``rotation``: the jobs served now and the timing derived from them;
- ``discovery``, ``reserver`` (+ ``intake``), ``inference``, ``poster``, ``keepalive``: the parts.
"""

from antenna_flows.worker.base import FatalWorkerError, PartFailed
from antenna_flows.worker.core import FairWorker

__all__ = ["FairWorker", "FatalWorkerError", "PartFailed"]
