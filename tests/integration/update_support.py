"""Shared parts of the signed-update integration tests: a fleet registry served by nginx, and devices.

``Fleet`` is the operator: a real registry made with ``edgert.registry`` in
tmp_path, published into ``site/`` and served by nginx. ``device_settings`` /
``device_env`` configure a device (in-process or a CLI subprocess) against it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from edgert.model_switch import RuntimeModelSwitch
from edgert.registry.evaluation import EvalAttachment
from edgert.registry.repository import Registry
from edgert.settings import Settings, load_settings
from edgert.update.orchestrator import Updater
from tests.integration.http_host import NginxHost

MODEL_ID = "tiny-gemma4:f16"
ENGINE = {"n_ctx": 512, "n_parallel": 1, "n_threads": 1, "n_threads_batch": 1, "n_batch": 128, "swa_full": False}


def make_variant(source: Path, destination: Path, **values: str | int) -> Path:
    """Copy a GGUF with some metadata values changed (``general_name="x"`` -> general.name)."""
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(destination, arch=arch)
    new = {}
    for key, value in values.items():
        name = key.replace("__", ".").replace("general_", "general.")
        kind = gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32
        new[name] = MetadataDetails(kind, value)
    copy_with_new_metadata(reader, writer, new, [])
    return destination


def broken_model(source: Path, destination: Path) -> Path:
    """Valid GGUF header (passes validate_gguf) that llama.cpp refuses: it claims a layer with no tensors."""
    return make_variant(source, destination, **{"gemma4__block_count": 3})


class Fleet:
    """An operator's registry (``reg/``), its published site (``site/``) and nginx serving the site."""

    def __init__(self, tmp_path: Path, model: Path, *, rate: int | None = None) -> None:
        self.tmp_path = tmp_path
        self.model = model
        self.registry = Registry.init(tmp_path / "reg")
        self.site = tmp_path / "site"
        self.site.mkdir()
        self.host = NginxHost(self.site, tmp_path / "nginx", rate=rate)

    @property
    def trusted_root(self) -> Path:
        return self.registry.metadata_dir / "1.root.json"

    def release(
        self,
        version: str,
        model: Path | None = None,
        *,
        rollout: int = 100,
        channel: str = "stable",
        signing_key: Path | None = None,
        evaluation: EvalAttachment | None = None,
        **kw: Any,
    ) -> None:
        """add (signed with model-signing when ``signing_key`` is given, with ``evaluation`` as its evaluation
        set: :func:`edgert.registry.evaluation.eval_attachment`) + promote + publish to the site."""
        self.registry.add(
            model or self.model, model_id=MODEL_ID, version=version, signing_key=signing_key, evaluation=evaluation
        )
        self.registry.promote(MODEL_ID, version, channel=channel, rollout=rollout)
        self.registry.publish(out=self.site, **kw)

    def target_file(self, version: str) -> Path:
        (path,) = (self.site / "targets" / "models" / MODEL_ID / version).glob("*.model.gguf")
        return path

    def member_file(self, version: str, member: str) -> Path:
        """The published file of one member of a folder release (``<sha256>.<name>`` in the site)."""
        directory, _, name = f"{MODEL_ID}/{version}/{member}".rpartition("/")
        (path,) = (p for p in (self.site / "targets" / "models" / directory).iterdir() if p.name[65:] == name)
        return path

    def signature_file(self, version: str) -> Path:
        """The published model-signing bundle (companion target ``model.gguf.sig``) of ``version``."""
        (path,) = (self.site / "targets" / "models" / MODEL_ID / version).glob("*.model.gguf.sig")
        return path

    def snapshot_site(self, name: str) -> Path:
        """A copy of the site as published now (for rollback and mix-and-match attacks)."""
        copy = self.tmp_path / name
        shutil.copytree(self.site, copy)
        return copy

    def serve(self, site: Path) -> None:
        """Make nginx serve ``site``'s files (replacing the published ones)."""
        shutil.rmtree(self.site)
        shutil.copytree(site, self.site)

    def __enter__(self) -> Fleet:
        self.host.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.host.stop()


def device_update(fleet: Fleet, **update: Any) -> dict[str, Any]:
    return {
        "registry_url": fleet.host.url,
        "trusted_root": str(fleet.trusted_root),
        "device_id": "device-0",
        "disk_reserve_bytes": 0,
        "hook_timeout_s": 5,
        "health_check_timeout_s": 60,
        **update,
    }


def device_settings(state_dir: Path, fleet: Fleet, **update: Any) -> Settings:
    return load_settings(state_dir=state_dir, engine=ENGINE, update=device_update(fleet, **update))


def device_env(state_dir: Path, fleet: Fleet, **update: Any) -> dict[str, str]:
    """Environment for an ``edgert update`` subprocess with the same settings as device_settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERT_")}
    env["EDGERT_STATE_DIR"] = str(state_dir)
    for key, value in ENGINE.items():
        env[f"EDGERT_ENGINE__{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    for key, value in device_update(fleet, **update).items():
        env[f"EDGERT_UPDATE__{key.upper()}"] = str(value)
    return env


def edgert_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgert", *args]


def write_hook(hooks_dir: Path, name: str, body: str) -> Path:
    hooks_dir.mkdir(parents=True, exist_ok=True)
    path = hooks_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def updater(tmp_path: Path, fleet: Fleet, switches: list[RuntimeModelSwitch], **update: object) -> Updater:
    """A device's updater in-process (its model switch closed by the ``switch_closer`` fixture)."""
    settings = device_settings(tmp_path / "device", fleet, **update)
    switch = RuntimeModelSwitch(settings)
    switches.append(switch)
    return Updater(settings, switch)


def signed_updater(
    tmp_path: Path, fleet: Fleet, switches: list[RuntimeModelSwitch], publisher: tuple[Path, Path], version: str
) -> Updater:
    """A device that requires publisher signatures and has installed the signed GGUF ``version``."""
    fleet.release(version, signing_key=publisher[0])
    device = updater(tmp_path, fleet, switches, publisher_public_key=str(publisher[1]))
    assert device.apply().outcome == "committed"
    return device
