"""Pipeline registry: slug -> stages, weights and label maps (filled in by the inference work).

Slugs are Antenna's pipeline slugs of the upstream AMI deployment.
"""

from __future__ import annotations

PIPELINE_SLUGS = [
    "moth_binary",
    "panama_moths_2024",
    "quebec_vermont_moths_2023",
    "uk_denmark_moths_2023",
    "global_moths_2024",
    "insect_orders_2025",
]


def pipeline_slugs() -> list[str]:
    return list(PIPELINE_SLUGS)
