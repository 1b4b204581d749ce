"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.model_switch import RuntimeModelSwitch
from tests.signing_keys import ec_key_pair


@pytest.fixture
def switch_closer() -> Iterator[list[RuntimeModelSwitch]]:
    """Model switches a test opened; closed (their models freed) when it ends."""
    switches: list[RuntimeModelSwitch] = []
    yield switches
    for switch in switches:
        switch.close()


@pytest.fixture
def publisher(tmp_path: Path) -> tuple[Path, Path]:
    """The publisher's (private, public) model-signing key pair."""
    return ec_key_pair(tmp_path, "publisher")
