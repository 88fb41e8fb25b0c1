"""antenna-flows: fair, Prefect-orchestrated GPU workers for the AMI Antenna platform."""

__version__ = "0.1.0"
