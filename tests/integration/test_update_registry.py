"""``edgert registry``: the operator's TUF repository, checked by the real device client."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root
from typer.testing import CliRunner

from edgert.cli import exitcodes
from edgert.cli.registry import app
from edgert.errors import RegistryError
from edgert.registry.repository import Registry
from edgert.update.orchestrator import Updater
from tests.integration.update_support import MODEL_ID, Fleet, device_settings, make_variant

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


def test_cli_init_add_promote_publish_status(tmp_path: Path, tiny_gguf: Path) -> None:
    reg, site = tmp_path / "reg", tmp_path / "site"
    code, out, err = cli("init", "-d", str(reg), "--keys", "root=2", "--threshold", "root=2")
    assert code == 0, err
    assert "offline" in out
    keys = sorted(p.name.split("-")[0] for p in (reg / "keys").glob("*.pem"))
    assert keys == ["root", "root", "snapshot", "targets", "timestamp"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (reg / "keys").glob("*.pem"))
    root = Metadata[Root].from_file(str(reg / "repository" / "metadata" / "1.root.json")).signed
    assert root.consistent_snapshot
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 2

    code, out, err = cli("add", str(tiny_gguf), "-d", str(reg), "--model-id", MODEL_ID, "--version", "1.0.0")
    assert code == 0, err
    assert "sha256 225b3276" in out
    code, out, err = cli("promote", MODEL_ID, "1.0.0", "-d", str(reg), "--channel", "beta", "--rollout", "20")
    assert code == 0, err
    code, out, err = cli("publish", "-d", str(reg), "--out", str(site))
    assert code == 0, err
    assert (site / "metadata" / "timestamp.json").is_file()
    assert len(list((site / "targets" / "models" / MODEL_ID / "1.0.0").glob("*.model.gguf"))) == 1

    code, out, err = cli("status", "-d", str(reg), "--json")
    assert code == 0, err
    report = json.loads(out)
    (model,) = report["models"]
    assert (model["model_id"], model["version"], model["architecture"], model["quant"]) == (
        MODEL_ID,
        "1.0.0",
        "gemma4",
        "F16",
    )
    assert model["context_length"] == 8192 and model["ram_mib"] > 0 and model["min_edgert_version"]
    assert report["channels"]["beta"]["rollout"] == 20
    assert not report["unpublished_changes"]
    assert all(role["warning"] is None for role in report["roles"])

    # versions are immutable; the timestamp can be refreshed alone
    code, _, err = cli("add", str(tiny_gguf), "-d", str(reg), "--model-id", MODEL_ID, "--version", "1.0.0")
    assert code == exitcodes.FAILURE and "immutable" in err
    code, out, err = cli("publish", "-d", str(reg), "--timestamp-only")
    assert code == 0, err
    assert "timestamp v2" in out and "targets v1" in out


def test_add_refuses_an_invalid_gguf(tmp_path: Path, tiny_gguf: Path) -> None:
    Registry.init(tmp_path / "reg")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:100_000])
    code, _, err = cli("add", str(bad), "-d", str(tmp_path / "reg"), "--model-id", MODEL_ID, "--version", "1")
    assert code == exitcodes.MODEL_INVALID
    assert "truncated" in err
    assert not list((tmp_path / "reg" / "repository" / "targets").rglob("*.gguf"))


def test_bad_arguments_are_clear_errors(tmp_path: Path, tiny_gguf: Path) -> None:
    code, _, err = cli("init", "-d", str(tmp_path / "r"), "--threshold", "root=2")
    assert code == exitcodes.FAILURE and "threshold 2 must be 1..1" in err
    registry = Registry.init(tmp_path / "reg")
    with pytest.raises(RegistryError, match="not in the registry"):
        registry.promote(MODEL_ID, "1.0.0", channel="stable", rollout=10)
    with pytest.raises(RegistryError, match="already holds a registry"):
        Registry.init(tmp_path / "reg")


def test_status_warns_about_expiring_metadata(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = Registry.init(tmp_path / "reg")
    registry.add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    registry.publish(now=datetime.now(UTC) - timedelta(hours=23))
    code, _, err = cli("status", "-d", str(tmp_path / "reg"))
    assert code == 0
    assert "warning: timestamp metadata expires soon" in err
    registry.publish(now=datetime.now(UTC) - timedelta(days=2))
    _, _, err = cli("status", "-d", str(tmp_path / "reg"))
    assert "warning: timestamp metadata expired" in err


@pytest.mark.parametrize("role", ["root", "targets", "timestamp"])
def test_rotated_keys_are_followed_by_devices(tmp_path: Path, fleet: Fleet, role: str) -> None:
    fleet.release("1.0.0")
    device = Updater(device_settings(tmp_path / "device", fleet))
    assert device.check().offered is not None  # trusts root v1

    code, out, err = cli("rotate-keys", role, "-d", str(fleet.registry.directory))
    assert code == 0, err
    assert list((fleet.registry.keys_dir / "retired").glob(f"{role}-*.pem"))
    fleet.release("2.0.0", make_variant(fleet.model, tmp_path / "v2.gguf", general_name="v2"))
    result = device.check()  # root v1 -> v2 chain, then metadata signed by the new keys
    assert result.offered is not None and result.offered.meta.version == "2.0.0"
    cached_root = Metadata[Root].from_file(str(tmp_path / "device" / "update" / "tuf" / "root.json")).signed
    assert cached_root.version == 2
