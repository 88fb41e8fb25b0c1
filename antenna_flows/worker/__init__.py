"""The fair worker, one module per part (see :mod:`antenna_flows.worker.core` for how they fit).

- ``core``: :class:`FairWorker`, its lifecycle and what the loops share;
- ``held``: the held-task store, each task in one explicit state;
- ``settle``: how a task ends (the only place it is released, dropped or terminated);
- ``discovery``, ``reserver``, ``slot``, ``poster``, ``heartbeat``: the loops.
"""

from antenna_flows.worker.base import FatalWorkerError
from antenna_flows.worker.core import FairWorker

__all__ = ["FairWorker", "FatalWorkerError"]
