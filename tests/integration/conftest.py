"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgert.model_switch import RuntimeModelSwitch


@pytest.fixture
def switch_closer() -> Iterator[list[RuntimeModelSwitch]]:
    """Model switches a test opened; closed (their models freed) when it ends."""
    switches: list[RuntimeModelSwitch] = []
    yield switches
    for switch in switches:
        switch.close()
