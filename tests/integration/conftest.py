"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.model_switch import RuntimeModelSwitch
from tests.integration.mosquitto import Broker
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


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real mosquitto for one test module (its devices and clients share it)."""
    broker = Broker(tmp_path_factory.mktemp("broker")).start()
    yield broker
    broker.stop()
