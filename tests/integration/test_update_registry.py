"""``edgert registry``: the operator's TUF repository, checked by the real device client."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import UpdaterConfig
from typer.testing import CliRunner

from edgert.cli import exitcodes
from edgert.cli.registry import app
from edgert.errors import RegistryError
from edgert.registry import publish, status
from edgert.registry.repository import Registry
from edgert.update.orchestrator import Updater
from tests.integration.http_host import NginxHost
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


def test_published_site_is_world_readable_and_served_by_an_unprivileged_nginx(tmp_path: Path, tiny_gguf: Path) -> None:
    """Finding 9: publish --out wrote root.json/timestamp.json 0600, so nginx as www-data answered 403."""
    reg, site = tmp_path / "reg", tmp_path / "site"
    assert cli("init", "-d", str(reg))[0] == 0
    assert cli("add", str(tiny_gguf), "-d", str(reg), "--model-id", MODEL_ID, "--version", "1.0.0")[0] == 0
    assert cli("promote", MODEL_ID, "1.0.0", "-d", str(reg))[0] == 0
    code, _, err = cli("publish", "-d", str(reg), "--out", str(site))
    assert code == 0, err
    files = [p for p in site.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"root.json", "1.root.json", "timestamp.json", "1.snapshot.json", "1.targets.json"} <= names
    modes = {str(p.relative_to(site)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o644}, modes
    with NginxHost(site, tmp_path / "nginx") as host:
        for path in files:
            relative = path.relative_to(site).as_posix()
            response = httpx.get(host.url + relative)
            assert response.status_code == 200, (relative, response.status_code)
            assert response.content == path.read_bytes()


def test_site_files_are_0644_whatever_the_umask(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = Registry.init(tmp_path / "reg")
    registry.add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    registry.promote(MODEL_ID, "1.0.0", channel="stable", rollout=100)
    old = os.umask(0o077)
    try:
        registry.publish(out=tmp_path / "site")
    finally:
        os.umask(old)
    for root in (registry.repo_dir, tmp_path / "site"):
        files = [p for p in root.rglob("*") if p.is_file()]
        assert files
        assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def _expires_in(site_or_repo: Path, name: str) -> timedelta:
    md = Metadata.from_file(str(site_or_repo / "metadata" / name))
    return md.signed.expires - datetime.now(UTC)


def test_expiry_takes_hours_and_minutes(tmp_path: Path, tiny_gguf: Path) -> None:
    """Finding 4: a short-lived timestamp is the freeze defence; --expiry took whole days only."""
    reg = tmp_path / "reg"
    code, _, err = cli(
        "init", "-d", str(reg), "--expiry", "timestamp=6h", "--expiry", "snapshot=2d", "--expiry", "targets=30"
    )
    assert code == 0, err
    assert cli("add", str(tiny_gguf), "-d", str(reg), "--model-id", MODEL_ID, "--version", "1.0.0")[0] == 0
    code, _, err = cli("publish", "-d", str(reg))
    assert code == 0, err
    repo = reg / "repository"
    assert timedelta(hours=5, minutes=58) < _expires_in(repo, "timestamp.json") <= timedelta(hours=6)
    assert timedelta(days=1, hours=23) < _expires_in(repo, "1.snapshot.json") <= timedelta(days=2)
    assert timedelta(days=29, hours=23) < _expires_in(repo, "1.targets.json") <= timedelta(days=30)

    # publish --expiry changes a lifetime from now on, and registry.json keeps it for the timer's next runs
    code, _, err = cli("publish", "-d", str(reg), "--timestamp-only", "--expiry", "timestamp=30m")
    assert code == 0, err
    assert timedelta(minutes=28) < _expires_in(repo, "timestamp.json") <= timedelta(minutes=30)
    code, _, err = cli("publish", "-d", str(reg), "--timestamp-only")
    assert code == 0, err
    assert timedelta(minutes=28) < _expires_in(repo, "timestamp.json") <= timedelta(minutes=30)
    assert Registry(reg).expiry()["timestamp"] == timedelta(minutes=30)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("timestamp=6x", "give days (7 or 7d), hours (6h) or minutes (30m)"),
        ("timestamp=0m", "timestamp: expiry 0m must be between 1m and 3650d"),
        ("timestamp", "--expiry wants ROLE=LIFETIME"),
        ("mirror=1d", "unknown role(s) mirror"),
    ],
)
def test_bad_expiry_is_a_clear_error(tmp_path: Path, value: str, message: str) -> None:
    code, _, err = cli("init", "-d", str(tmp_path / "reg"), "--expiry", value)
    assert code == exitcodes.FAILURE
    assert message in err


def test_a_registry_made_before_expiry_s_keeps_its_days(tmp_path: Path) -> None:
    registry = Registry.init(tmp_path / "reg")
    (tmp_path / "reg" / "registry.json").write_text(
        '{"expiry_days": {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 2}}'
    )
    assert registry.expiry()["timestamp"] == timedelta(days=2)
    registry.set_expiry({"timestamp": timedelta(hours=6)})
    assert registry.expiry() == {
        "root": timedelta(days=365),
        "targets": timedelta(days=90),
        "snapshot": timedelta(days=7),
        "timestamp": timedelta(hours=6),
    }


def _version_dirs(site: Path) -> list[str]:
    return sorted(p.name for p in (site / "targets" / "models" / MODEL_ID).iterdir())


def test_prune_keeps_the_newest_and_what_channels_offer(tmp_path: Path, fleet: Fleet) -> None:
    """Finding 18: old targets were never pruned, so targets.json grew towards the 5 MB devices accept."""
    for version in ("1.0.0", "1.2.0", "1.10.0", "2.0.0"):
        fleet.registry.add(fleet.model, model_id=MODEL_ID, version=version)
    fleet.registry.promote(MODEL_ID, "1.0.0", channel="stable", rollout=100)
    fleet.registry.promote(MODEL_ID, "1.2.0", channel="stable", rollout=50)  # others stay on 1.0.0
    fleet.registry.publish(out=fleet.site)
    reg = str(fleet.registry.directory)

    code, out, err = cli("prune", "-d", reg, "--keep", "1")
    assert code == 0, err
    assert "kept tiny-gemma4:f16@1.0.0: a channel offers it" in out
    assert "kept tiny-gemma4:f16@1.2.0: a channel offers it" in out
    assert "dropped tiny-gemma4:f16@1.10.0;" in out  # 1.10.0 < 2.0.0: numbers compare as numbers
    assert _version_dirs(fleet.site) == ["1.0.0", "1.10.0", "1.2.0", "2.0.0"]  # files go at publish

    code, out, err = cli("publish", "-d", reg, "--out", str(fleet.site))
    assert code == 0, err
    assert "files of pruned versions deleted" in out
    assert _version_dirs(fleet.site) == ["1.0.0", "1.2.0", "2.0.0"]
    assert _version_dirs(fleet.registry.repo_dir) == ["1.0.0", "1.2.0", "2.0.0"]
    versions = sorted(m.meta.version for m in fleet.registry.status().models)
    assert versions == ["1.0.0", "1.2.0", "2.0.0"]

    device = Updater(device_settings(tmp_path / "device", fleet))
    offered = device.check().offered  # the smaller, re-signed metadata is accepted
    assert offered is not None and offered.meta.version in ("1.0.0", "1.2.0")

    code, out, _ = cli("prune", "-d", reg, "--keep", "3")
    assert code == 0 and "nothing to drop" in out
    code, _, err = cli("prune", "-d", reg, "--keep", "0")
    assert code == exitcodes.USAGE


def test_status_warns_near_the_targets_size_limit_and_publish_refuses_past_it(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry.init(tmp_path / "reg")
    registry.add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    registry.publish()
    size = (registry.metadata_dir / "1.targets.json").stat().st_size
    code, out, err = cli("status", "-d", str(registry.directory))
    assert code == 0 and "targets metadata" not in err
    assert f"targets metadata: {size} bytes, 0.0 % of the 5000000 devices accept" in out

    # The real limit is python-tuf's 5 MB; lowered so one small registry reaches it (status reports it...
    monkeypatch.setattr(status, "TARGETS_MAX_LENGTH", int(size / 0.85))
    code, out, err = cli("status", "-d", str(registry.directory), "--json")
    assert code == 0
    assert f"warning: targets metadata is {size} bytes, 85 % of the" in err
    assert "edgert registry prune --keep N" in err
    assert json.loads(out)["targets_bytes"] == size

    registry.add(tiny_gguf, model_id=MODEL_ID, version="2.0.0")
    monkeypatch.setattr(publish, "TARGETS_MAX_LENGTH", size + 10)  # ... publish enforces it)
    code, _, err = cli("publish", "-d", str(registry.directory))
    assert code == exitcodes.FAILURE
    assert "over the" in err and "devices accept" in err
    assert not (registry.metadata_dir / "2.targets.json").exists()


def test_targets_limit_is_python_tufs() -> None:
    assert publish.TARGETS_MAX_LENGTH == status.TARGETS_MAX_LENGTH == UpdaterConfig().targets_max_length == 5_000_000


def test_publish_repairs_files_an_older_edgert_wrote_0600(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = Registry.init(tmp_path / "reg")
    registry.add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    site = tmp_path / "site"
    registry.publish(out=site)
    for root in (registry.repo_dir, site):
        for path in root.rglob("*"):
            if path.is_file():
                path.chmod(0o600)
    registry.publish(out=site, timestamp_only=True)  # copies nothing new: same names, same sizes
    for root in (registry.repo_dir, site):
        assert {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()} == {0o644}
