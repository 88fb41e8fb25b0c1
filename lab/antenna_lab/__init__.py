"""The lab: everything that exists to run, test and measure the worker, never part of it.

- :mod:`antenna_lab.antenna`: a local Antenna (API, job streams, nats-server runner, demo images);
- :mod:`antenna_lab.bench`: scenarios, the bench, compare, the upstream drain baseline, the GPU benchmark.

The product (the rest of ``antenna_flows``, ``flows/``, ``tasks/``) never imports from here
(``tests/test_layout.py`` fails if it does).
"""
