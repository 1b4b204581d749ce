"""Attacks on the update channel: each must install nothing and leave the committed model in place.

The device first installs 1.0.0 from a real registry (nginx on loopback); the
operator then publishes 2.0.0 and an attacker who controls the HTTP host (or the
network) alters what is served. python-tuf's client rules catch the metadata
attacks; the downloader's signed-length cap and streaming hashes catch the rest.
"""

from __future__ import annotations

import gc
import http.server
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Targets

from edgert.errors import (
    DownloadError,
    IntegrityError,
    RegistryUnavailableError,
    TargetNotFoundError,
    UntrustedMetadataError,
    UpdateError,
)
from edgert.model_switch import RuntimeModelSwitch
from edgert.update.orchestrator import Updater
from edgert.update.state import Phase
from tests.integration.hostile_registry import HostileRegistry, Mode
from tests.integration.update_support import (
    MODEL_ID,
    Fleet,
    device_env,
    device_settings,
    edgert_cmd,
    make_variant,
)


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        running.release("1.0.0")
        yield running


@pytest.fixture
def device(tmp_path: Path, fleet: Fleet) -> Iterator[Updater]:
    settings = device_settings(tmp_path / "device", fleet)
    switch = RuntimeModelSwitch(settings)
    updater = Updater(settings, switch)
    assert updater.apply().outcome == "committed"
    yield updater
    switch.close()


def release_v2(fleet: Fleet, tmp_path: Path, **publish: object) -> None:
    fleet.release("2.0.0", make_variant(fleet.model, tmp_path / "v2.gguf", general_name="v2"), **publish)


def assert_failure_recorded(device: Updater, reason: str) -> None:
    """The round's failure is named by its reason class in ``last_error`` and in the history."""
    state = device.status()
    assert state.last_error is not None and state.last_error.startswith(f"{reason}: "), state.last_error
    assert f"failed ({reason}): " in state.history[-1], state.history


def assert_still_on_v1(device: Updater, tmp_path: Path) -> None:
    state = device.status()
    assert state.phase is Phase.IDLE
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert state.pending is None
    versions = tmp_path / "device" / "models" / "versions"
    assert sorted(p.name for p in versions.iterdir()) == ["tiny-gemma4+f16@1.0.0.gguf"]
    assert os.readlink(tmp_path / "device" / "models" / "current.gguf") == "versions/tiny-gemma4+f16@1.0.0.gguf"


def test_tampered_target_bytes(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    release_v2(fleet, tmp_path)
    target = fleet.target_file("2.0.0")
    data = bytearray(target.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit in the weights: the header still validates
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        device.apply()
    assert_failure_recorded(device, "hash_length")
    assert_still_on_v1(device, tmp_path)


def test_targets_signed_by_a_wrong_key(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    release_v2(fleet, tmp_path)
    path = fleet.site / "metadata" / "2.targets.json"
    md: Metadata[Targets] = Metadata.from_file(str(path))
    md.sign(CryptoSigner.generate_ed25519())  # replaces the real signature with an untrusted key's
    md.to_file(str(path))
    with pytest.raises(UntrustedMetadataError, match="signed metadata rejected"):
        device.apply()
    assert_failure_recorded(device, "signature")
    assert_still_on_v1(device, tmp_path)


def test_rollback_to_older_metadata(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    old_site = fleet.snapshot_site("site-v1")
    release_v2(fleet, tmp_path)
    assert device.check().offered is not None  # the device has now seen timestamp v2
    fleet.serve(old_site)  # the attacker replays the older, validly signed publication
    with pytest.raises(UntrustedMetadataError, match="BadVersionNumberError"):
        device.apply()
    assert_failure_recorded(device, "rollback")
    assert_still_on_v1(device, tmp_path)


def test_freeze_with_an_expired_timestamp(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    release_v2(fleet, tmp_path, now=datetime.now(UTC) - timedelta(days=3))
    with pytest.raises(UntrustedMetadataError, match="ExpiredMetadataError"):
        device.apply()
    assert_failure_recorded(device, "expired")
    assert_still_on_v1(device, tmp_path)


def test_mix_and_match_metadata(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    old_targets = (fleet.site / "metadata" / "1.targets.json").read_bytes()
    release_v2(fleet, tmp_path)
    # Valid, correctly signed targets of the older publication served under the new snapshot's name.
    (fleet.site / "metadata" / "2.targets.json").write_bytes(old_targets)
    with pytest.raises(UntrustedMetadataError, match="Expected targets v2, got v1"):
        device.apply()
    assert_failure_recorded(device, "rollback")
    assert_still_on_v1(device, tmp_path)


def test_truncated_target(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    release_v2(fleet, tmp_path)
    target = fleet.target_file("2.0.0")
    target.write_bytes(target.read_bytes()[:500_000])
    with pytest.raises(IntegrityError, match="signed length"):
        device.apply()
    assert_failure_recorded(device, "hash_length")
    assert_still_on_v1(device, tmp_path)


def test_arbitrary_target_not_in_metadata(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    # The attacker drops a file into the host's targets and asks devices to install "6.6.6".
    evil = fleet.site / "targets" / "models" / MODEL_ID / "6.6.6"
    evil.mkdir(parents=True)
    (evil / "model.gguf").write_bytes(fleet.model.read_bytes())
    with pytest.raises(TargetNotFoundError, match="not in the registry's signed targets"):
        device.apply(pin_version="6.6.6")
    assert_failure_recorded(device, "target_not_found")
    assert_still_on_v1(device, tmp_path)


class _EndlessHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with an endless body and no Content-Length."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"\0" * 65536
        try:
            while True:
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_endless_data_is_cut_at_the_signed_length(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    release_v2(fleet, tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EndlessHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = device_settings(
            tmp_path / "device", fleet, targets_url=f"http://127.0.0.1:{server.server_address[1]}/"
        )
        switch = RuntimeModelSwitch(settings)
        try:
            with pytest.raises(IntegrityError, match="more than the signed"):
                Updater(settings, switch).apply()
        finally:
            switch.close()
    finally:
        server.shutdown()
        server.server_close()
    assert_failure_recorded(device, "hash_length")
    assert_still_on_v1(device, tmp_path)
    assert not list((tmp_path / "device" / "models" / "versions").glob("*.part"))


@pytest.fixture
def hostile(fleet: Fleet) -> Iterator[HostileRegistry]:
    with HostileRegistry(fleet.site) as host:
        yield host
    # python-tuf's urllib3 fetcher returns a connection broken mid-body to its pool, which only the
    # garbage collector closes (a ResourceWarning): collect it here, in the test that caused it.
    gc.collect()


def hostile_device(tmp_path: Path, fleet: Fleet, hostile: HostileRegistry) -> Updater:
    """The device of the ``device`` fixture (same state, same trusted metadata), its metadata now from ``hostile``."""
    settings = device_settings(
        tmp_path / "device", fleet, registry_url=hostile.url, targets_url=f"{fleet.host.url}targets/"
    )
    return Updater(settings)


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    ("mode", "error", "reason", "message"),
    [
        ("truncate", RegistryUnavailableError, "connection_dropped", "connection dropped"),
        ("drop", RegistryUnavailableError, "connection_dropped", "connection dropped"),
        ("oversized", UntrustedMetadataError, "oversized", "larger than python-tuf accepts"),
    ],
)
def test_mangled_metadata_response_is_named_and_recorded(
    tmp_path: Path,
    fleet: Fleet,
    device: Updater,
    hostile: HostileRegistry,
    mode: Mode,
    error: type[UpdateError],
    reason: str,
    message: str,
) -> None:
    release_v2(fleet, tmp_path)
    hostile.mode = mode
    with pytest.raises(error, match=message) as raised:
        hostile_device(tmp_path, fleet, hostile).apply()
    assert raised.value.reason == reason
    assert any(path.endswith("/timestamp.json") for path in hostile.requests)
    assert_failure_recorded(device, reason)
    assert_still_on_v1(device, tmp_path)


def test_cli_names_a_truncated_metadata_response_in_one_line(
    tmp_path: Path, fleet: Fleet, device: Updater, hostile: HostileRegistry
) -> None:
    release_v2(fleet, tmp_path)
    hostile.mode = "truncate"
    env = device_env(tmp_path / "device", fleet, registry_url=hostile.url, targets_url=f"{fleet.host.url}targets/")
    proc = subprocess.run(
        edgert_cmd("update", "apply"), env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: connection_dropped: ")
    assert_failure_recorded(device, "connection_dropped")
    assert_still_on_v1(device, tmp_path)


def test_credentials_in_urls_never_reach_the_state_or_the_log(
    tmp_path: Path, fleet: Fleet, device: Updater, hostile: HostileRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    release_v2(fleet, tmp_path)
    port = fleet.host.url.rstrip("/").rpartition(":")[2]
    settings = device_settings(
        tmp_path / "device",
        fleet,
        registry_url=hostile.url.replace("http://", "http://edgert:s3cret@"),
        # a pre-signed style URL: the token is in the query (and makes every target URL a 403 here)
        targets_url=f"http://edgert:s3cret@127.0.0.1:{port}/targets/?token=t0ken&x=",
    )
    switch = RuntimeModelSwitch(settings)
    try:
        with caplog.at_level(logging.DEBUG, logger="edgert"), pytest.raises(DownloadError, match="HTTP 403"):
            Updater(settings, switch).apply()
    finally:
        switch.close()
    recorded = device.status().model_dump_json()
    assert "127.0.0.1" in recorded  # the failure is recorded, with the host it concerns
    for secret in ("s3cret", "t0ken"):
        assert secret not in recorded
        assert secret not in caplog.text
