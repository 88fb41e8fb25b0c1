"""The fleet-wide queue report: every incomplete Antenna job's queue counts, progress, rate and ETA.

- :mod:`.readers`: what the report reads (Antenna's REST API, NATS JetStream's consumers, Prefect's
  artifacts), each source on its own and a report without one source still a report;
- :mod:`.rows`: how readings become rows and words (pure: no I/O, tested with plain data).

The ``queue-report`` flow (``flows/queue_report.py``) runs them once a minute.
"""
