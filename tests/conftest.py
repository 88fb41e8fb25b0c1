"""Fixtures of the product's tests (the shared ones, real NATS and local Antennas, are in the root conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from antenna_lab.antenna.admin import AsyncAntennaAdmin


@pytest.fixture
async def aadmin(stack: Any):
    async with AsyncAntennaAdmin(stack.api_url, stack.token) as client:
        yield client
