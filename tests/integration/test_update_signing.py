"""Publisher signatures: OpenSSF model-signing bundles as companion TUF targets, verified before staging.

A real registry served by nginx and the real engine, as in test_update_flow; the
publisher's EC P-256 key pair is generated here. With ``update.publisher_public_key``
set, a release must carry a bundle that verifies with it, else nothing is installed
and the committed model keeps serving; without the setting, unsigned releases install.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from edgert.model_switch import RuntimeModelSwitch
from edgert.update.orchestrator import Updater
from edgert.update.publisher_signature import PublisherSignatureError
from edgert.update.registry import RegistryClient
from edgert.update.state import Phase
from tests.integration.update_support import (
    MODEL_ID,
    Fleet,
    device_env,
    edgert_cmd,
    make_variant,
    signed_updater,
    updater,
)
from tests.signing_keys import ec_key_pair

V1_FILE = "tiny-gemma4+f16@1.0.0.gguf"


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


@pytest.fixture
def device(
    tmp_path: Path, fleet: Fleet, publisher: tuple[Path, Path], switch_closer: list[RuntimeModelSwitch]
) -> Updater:
    """A device that requires publisher signatures and has installed the signed 1.0.0."""
    return signed_updater(tmp_path, fleet, switch_closer, publisher, "1.0.0")


def release_v2(fleet: Fleet, tmp_path: Path, signing_key: Path | None) -> None:
    fleet.release("2.0.0", make_variant(fleet.model, tmp_path / "v2.gguf", general_name="v2"), signing_key=signing_key)


def assert_still_on_v1(device: Updater, tmp_path: Path) -> None:
    state = device.status()
    assert state.phase is Phase.IDLE
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert state.pending is None
    assert state.last_error is not None and "refused before staging" in state.last_error
    assert "tiny-gemma4:f16@2.0.0" not in state.blocklist  # refused, never activated: nothing to blocklist
    models = tmp_path / "device" / "models"
    assert sorted(p.name for p in (models / "versions").iterdir()) == [V1_FILE]
    assert os.readlink(models / "current.gguf") == f"versions/{V1_FILE}"
    assert not [p for p in models.iterdir() if p.name.startswith(".publisher-signature-")]


def test_signed_release_installs_and_upgrades(tmp_path: Path, fleet: Fleet, publisher: tuple[Path, Path]) -> None:
    # The operator signs through the CLI; the device applies through the CLI.
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(fleet.model.read_bytes())
    add = subprocess.run(
        [
            *edgert_cmd("registry", "add", "-d", str(fleet.registry.directory), str(v1)),
            *("--model-id", MODEL_ID, "--version", "1.0.0", "--sign-key", str(publisher[0])),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert add.returncode == 0, add.stderr
    assert "model.gguf.sig" in add.stdout
    fleet.registry.promote(MODEL_ID, "1.0.0", channel="stable", rollout=100)
    fleet.registry.publish(out=fleet.site)

    bundle = json.loads(fleet.signature_file("1.0.0").read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert [subject["name"] for subject in statement["subject"]] == ["model.gguf"]

    env = device_env(tmp_path / "device", fleet, publisher_public_key=str(publisher[1]))
    applied = subprocess.run(
        [*edgert_cmd("update", "apply")], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert applied.returncode == 0, applied.stderr
    assert os.readlink(tmp_path / "device" / "models" / "current.gguf") == f"versions/{V1_FILE}"


def test_signed_upgrade_in_process(
    tmp_path: Path, fleet: Fleet, publisher: tuple[Path, Path], device: Updater, monkeypatch: pytest.MonkeyPatch
) -> None:
    release_v2(fleet, tmp_path, publisher[0])
    refreshed: list[object] = []
    real_refresh = RegistryClient.refresh

    def counting_refresh(client: RegistryClient) -> None:
        refreshed.append(client)
        real_refresh(client)

    monkeypatch.setattr(RegistryClient, "refresh", counting_refresh)
    result = device.apply()
    assert result.outcome == "committed" and result.release == "tiny-gemma4:f16@2.0.0"
    # one registry client per round: the publisher-signature check uses the metadata the check refreshed
    assert len(refreshed) == 1


def test_release_without_bundle_is_refused(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    release_v2(fleet, tmp_path, None)
    with pytest.raises(PublisherSignatureError, match="no model-signing bundle"):
        device.apply()
    assert_still_on_v1(device, tmp_path)


def test_bundle_signed_by_another_key_is_refused(tmp_path: Path, fleet: Fleet, device: Updater) -> None:
    other, _ = ec_key_pair(tmp_path, "impostor")
    release_v2(fleet, tmp_path, other)
    with pytest.raises(PublisherSignatureError, match="does not verify"):
        device.apply()
    assert_still_on_v1(device, tmp_path)


def test_bundle_tampered_on_the_host_is_refused(
    tmp_path: Path, fleet: Fleet, publisher: tuple[Path, Path], device: Updater
) -> None:
    release_v2(fleet, tmp_path, publisher[0])
    path = fleet.signature_file("2.0.0")
    path.write_bytes(path.read_bytes().replace(b'"mediaType"', b'"mediatype"'))
    with pytest.raises(PublisherSignatureError, match="does not match its signed metadata"):
        device.apply()
    assert_still_on_v1(device, tmp_path)


def test_forged_bundle_in_signed_metadata_is_refused(
    tmp_path: Path, fleet: Fleet, publisher: tuple[Path, Path], device: Updater
) -> None:
    """A registry compromise (or mistake) publishes a TUF-valid bundle whose signature is wrong: still refused."""
    release_v2(fleet, tmp_path, publisher[0])
    registry = fleet.registry
    staging = registry._load_staging()
    sig_path = f"models/{MODEL_ID}/2.0.0/model.gguf.sig"
    bundle = json.loads(fleet.signature_file("2.0.0").read_text())
    signature = bundle["dsseEnvelope"]["signatures"][0]
    raw = bytearray(base64.b64decode(signature["sig"]))
    raw[-1] ^= 0x01
    signature["sig"] = base64.b64encode(bytes(raw)).decode()
    forged = json.dumps(bundle).encode()
    target = TargetFile.from_data(sig_path, forged, ["sha256"])
    registry._write_target_bytes(forged, target)
    staging.signed.targets[sig_path] = target
    registry._save_staging(staging)
    registry.publish(out=fleet.site)
    with pytest.raises(PublisherSignatureError, match="does not verify"):
        device.apply()
    assert_still_on_v1(device, tmp_path)


def test_unsigned_releases_install_without_the_setting(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    release_v2(fleet, tmp_path, None)
    assert device.apply().outcome == "committed"
    assert device.status().current is not None and device.status().current.meta.version == "2.0.0"
