"""The GPU fleet under Prefect: which worker runs should exist (:mod:`.spec`) and the keeper that makes it so (:mod:`.keeper`).

``python -m antenna_flows.fleet worker-command <host>`` prints a GPU host's ``prefect worker start`` line.
"""
