"""``edgert registry add`` of an ONNX Runtime GenAI folder: one signed target per file, validated first."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from edgert.cli import exitcodes
from edgert.cli.registry import app
from edgert.errors import ModelFileError, RegistryError
from edgert.registry.repository import Registry
from edgert.registry.staging import folder_members
from edgert.update import publisher_signature
from edgert.update.manifest import MODEL_KEY, ModelMeta, model_target_path
from edgert.update.publisher_signature import PublisherSignatureError
from edgert.update.state import choose_target
from tests.signing_keys import ec_key_pair
from tests.unit.test_update_state import MODEL as STATE_MODEL
from tests.unit.test_update_state import pointer

MODEL_ID = "tiny-gemma3:onnx"
runner = CliRunner()


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry.init(tmp_path / "reg")


@pytest.fixture
def folder(tmp_path: Path, tiny_onnx: Path) -> Path:
    """A writable copy of the tiny ONNX fixture."""
    return Path(shutil.copytree(tiny_onnx, tmp_path / "model"))


def staged(registry: Registry) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(registry.staging_file.read_bytes())
    targets: dict[str, Any] = data["signed"]["targets"]
    return targets


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_every_file_is_a_signed_target_and_the_config_target_lists_them(registry: Registry, folder: Path) -> None:
    (folder / ".gitattributes").write_text("*.data filter=lfs\n")  # hidden junk is left out
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.lock").write_text("")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("nested files keep their relative path\n")
    added = registry.add(folder, model_id=MODEL_ID, version="2.0.0")

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = [f for f in files if not f.startswith(".")]
    meta = added.meta
    assert meta.format == "onnx-genai" and meta.is_folder
    assert list(meta.files) == files
    assert "genai_config.json" in files and "model.onnx.data" in files and "extra/notes.txt" in files
    assert (meta.architecture, meta.quant, meta.context_length) == ("gemma3_text", None, 2048)
    assert meta.file_name == "model"
    assert added.target_path == f"models/{MODEL_ID}/2.0.0/genai_config.json"
    assert added.length == sum((folder / f).stat().st_size for f in files)

    targets = staged(registry)
    prefix = f"models/{MODEL_ID}/2.0.0/"
    assert sorted(path.removeprefix(prefix) for path in targets) == files
    for name in files:
        target = targets[prefix + name]
        data = (folder / name).read_bytes()
        assert target["length"] == len(data)
        assert target["hashes"] == {"sha256": hashlib.sha256(data).hexdigest()}
        # the bytes are in the site under their consistent-snapshot name
        directory, _, base = (prefix + name).rpartition("/")
        published = registry.targets_dir / directory / f"{target['hashes']['sha256']}.{base}"
        assert published.read_bytes() == data
        custom = target.get("custom")
        if name == "genai_config.json":
            assert ModelMeta.model_validate(custom[MODEL_KEY]) == meta
        else:
            assert custom is None  # one model, one ModelMeta

    # promote finds the folder version; status counts all its bytes
    registry.promote(MODEL_ID, "2.0.0", channel="stable", rollout=100)
    registry.publish()
    (model,) = registry.status().models
    assert (model.target_path, model.length, model.meta.files) == (added.target_path, added.length, meta.files)


def test_gguf_metadata_stays_readable_by_older_devices(registry: Registry, tiny_gguf: Path) -> None:
    added = registry.add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    custom = staged(registry)[model_target_path(MODEL_ID, "1.0.0")]["custom"][MODEL_KEY]
    assert "format" not in custom and "files" not in custom  # what an edgert before folders expects
    assert ModelMeta.model_validate(custom).format == "gguf"
    assert added.meta.target_paths() == (model_target_path(MODEL_ID, "1.0.0"),)


def test_versions_are_immutable_across_formats(registry: Registry, folder: Path, tiny_gguf: Path) -> None:
    registry.add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    with pytest.raises(RegistryError, match="immutable"):
        registry.add(folder, model_id=MODEL_ID, version="1.0.0")
    registry.add(folder, model_id=MODEL_ID, version="2.0.0")
    with pytest.raises(RegistryError, match="immutable"):
        registry.add(tiny_gguf, model_id=MODEL_ID, version="2.0.0")


def _set_type(folder: Path, arch: str) -> None:
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["type"] = arch
    (folder / "genai_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("defect", "expected"),
    [
        ("missing-config", "missing genai_config.json"),
        ("vision-architecture", "unsupported architecture 'gemma3'"),
        ("missing-weights-file", "missing model.onnx"),
        ("missing-tokenizer", "missing tokenizer.json"),
    ],
)
def test_invalid_folders_are_refused_with_the_engines_message(
    tmp_path: Path, registry: Registry, folder: Path, defect: str, expected: str
) -> None:
    if defect == "missing-config":
        (folder / "genai_config.json").unlink()
    elif defect == "vision-architecture":
        _set_type(folder, "gemma3")
    elif defect == "missing-weights-file":
        (folder / "model.onnx").unlink()
    else:
        (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match=expected):
        registry.add(folder, model_id=MODEL_ID, version="1")
    code, _, err = cli("add", str(folder), "-d", str(registry.directory), "--model-id", MODEL_ID, "--version", "1")
    assert code == exitcodes.MODEL_INVALID
    assert expected in err and str(folder) in err
    assert staged(registry) == {}
    assert not [p for p in registry.targets_dir.rglob("*") if p.is_file()]


def test_unsafe_or_empty_folders_are_refused(tmp_path: Path, registry: Registry, folder: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_text("")
    with pytest.raises(RegistryError, match="no files to publish"):
        registry.add(empty, model_id=MODEL_ID, version="1")

    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the model")
    (folder / "notes.txt").symlink_to(outside)
    with pytest.raises(RegistryError, match=r"notes\.txt is a symbolic link"):
        registry.add(folder, model_id=MODEL_ID, version="1")
    (folder / "notes.txt").unlink()
    (folder / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(RegistryError, match="sub is a symbolic link"):
        folder_members(folder)
    (folder / "sub").unlink()

    (folder / "read me.txt").write_text("spaces do not make a target path")
    with pytest.raises(RegistryError, match=r"'read me\.txt' cannot be a target path"):
        registry.add(folder, model_id=MODEL_ID, version="1")
    (folder / "read me.txt").unlink()
    (folder / "weights.part").write_text("")
    with pytest.raises(RegistryError, match="cannot be a target path"):
        registry.add(folder, model_id=MODEL_ID, version="1")
    (folder / "weights.part").unlink()

    code, _, err = cli(
        "add", str(folder), "-d", str(registry.directory), "--model-id", MODEL_ID, "--version", "1",
        "--sign-key", str(outside),
    )  # fmt: skip
    assert code == exitcodes.CONFIG and f"signing key {outside}" in err  # not a key: refused before any copy
    assert staged(registry) == {}
    assert not [p for p in registry.targets_dir.rglob("*") if p.is_file()]

    code, out, err = cli("add", str(folder), "-d", str(registry.directory), "--model-id", MODEL_ID, "--version", "1")
    assert code == 0, err
    assert "onnx-genai folder, 7 files" in out


def test_add_sign_key_signs_exactly_the_published_members_of_a_folder(
    tmp_path: Path, registry: Registry, folder: Path
) -> None:
    """--sign-key on a folder: one model-signing bundle over the members, staged as genai_config.json.sig."""
    private, public = ec_key_pair(tmp_path, "publisher")
    (folder / ".gitattributes").write_text("*.data filter=lfs\n")  # hidden: neither published nor signed
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.lock").write_text("")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("signed under its relative path\n")
    code, out, err = cli(
        "add", str(folder), "-d", str(registry.directory), "--model-id", MODEL_ID, "--version", "2.0.0",
        "--sign-key", str(private),
    )  # fmt: skip
    assert code == 0, err
    prefix = f"models/{MODEL_ID}/2.0.0/"
    assert f"added {prefix}genai_config.json.sig (model-signing bundle" in out

    targets = staged(registry)
    members = folder_members(folder)
    assert sorted(targets) == sorted([*(prefix + m for m in members), prefix + "genai_config.json.sig"])
    signature = targets[prefix + "genai_config.json.sig"]
    assert signature.get("custom") is None
    bundle = (
        registry.targets_dir / "models" / MODEL_ID / "2.0.0" / f"{signature['hashes']['sha256']}.genai_config.json.sig"
    )
    assert len(bundle.read_bytes()) == signature["length"]
    statement = json.loads(base64.b64decode(json.loads(bundle.read_bytes())["dsseEnvelope"]["payload"]))
    assert [subject["name"] for subject in statement["subject"]] == ["model"]  # the folder's name, informative
    resources = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    assert sorted(resources) == list(members)  # exactly the published set: no .gitattributes, no .cache/
    for member in members:  # the same SHA-256 the TUF targets carry
        assert resources[member] == targets[prefix + member]["hashes"]["sha256"]
    assert "ignore_paths" not in statement["predicate"]["serialization"]

    # what a device does with its verified staging folder: exactly the members verify ...
    device = tmp_path / "staging"
    for member in members:
        (device / member).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / member, device / member)
    publisher_signature.verify_folder(device, members, bundle, public)
    # ... another key, an extra file, a missing file or a changed byte do not
    _, impostor = ec_key_pair(tmp_path, "impostor")
    with pytest.raises(PublisherSignatureError, match="does not verify"):
        publisher_signature.verify_folder(device, members, bundle, impostor)
    (device / "unsigned.txt").write_text("x")
    with pytest.raises(PublisherSignatureError, match="Extra files"):
        publisher_signature.verify_folder(device, [*members, "unsigned.txt"], bundle, public)
    (device / "unsigned.txt").unlink()
    (device / "extra" / "notes.txt").unlink()
    with pytest.raises(PublisherSignatureError, match="Missing files"):
        publisher_signature.verify_folder(device, [m for m in members if m != "extra/notes.txt"], bundle, public)
    (device / "extra" / "notes.txt").write_text("signed under its relative path!\n")
    with pytest.raises(PublisherSignatureError, match=r"Hash mismatch for 'extra/notes\.txt'"):
        publisher_signature.verify_folder(device, members, bundle, public)


def test_a_bundle_that_leaves_a_member_unsigned_does_not_cover_the_release(tmp_path: Path, folder: Path) -> None:
    """A publisher bundle made with ignore_paths verifies the rest of the folder, but a device wants every member."""
    from model_signing import hashing, signing

    private, public = ec_key_pair(tmp_path, "publisher")
    bundle = tmp_path / "bundle.sig"
    config = signing.Config().use_elliptic_key_signer(private_key=private)
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=["tokenizer.json"]))
    config.sign(folder, bundle)
    with pytest.raises(PublisherSignatureError, match=r"unsigned: \['tokenizer.json'\]"):
        publisher_signature.verify_folder(folder, folder_members(folder), bundle, public)


def _meta(**fields: Any) -> dict[str, Any]:
    base = {
        "model_id": MODEL_ID,
        "version": "1",
        "architecture": "gemma3_text",
        "ram_mib": 64,
        "min_edgert_version": "0.1",
        "file_name": "model",
        "format": "onnx-genai",
        "files": ["genai_config.json", "model.onnx", "tokenizer.json"],
    }
    return base | fields


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"files": ["genai_config.json", "../etc/passwd"]}, "not a safe relative path"),
        ({"files": ["genai_config.json", "/etc/passwd"]}, "not a safe relative path"),
        ({"files": ["genai_config.json", "a/./b"]}, "not a safe relative path"),
        ({"files": ["genai_config.json", ".hidden"]}, "not a safe relative path"),
        ({"files": ["genai_config.json", "x.part"]}, "not a safe relative path"),
        ({"files": ["model.onnx"]}, "must contain genai_config.json"),
        ({"files": ["genai_config.json", "genai_config.json"]}, "more than once"),
        ({"files": ["genai_config.json", "model.gguf"]}, "may not contain model.gguf"),
        ({"files": ["genai_config.json", "genai_config.json.sig"]}, "publisher signature's target name"),
        ({"files": [f"f{i}" for i in range(300)]}, "at most 256"),
        ({"format": "gguf"}, "lists no member files"),
        ({"format": "safetensors"}, "format"),
    ],
)
def test_signed_folder_metadata_is_checked_on_the_device_too(fields: dict[str, Any], problem: str) -> None:
    """The device parses ModelMeta from signed metadata: a bad member list is refused before any download."""
    with pytest.raises(ValidationError, match=problem):
        ModelMeta.model_validate(_meta(**fields))


def test_metadata_from_before_folders_reads_as_gguf() -> None:
    old = {k: v for k, v in _meta().items() if k not in ("format", "files")}
    meta = ModelMeta.model_validate(old)
    assert (meta.format, meta.files, meta.is_folder) == ("gguf", (), False)


def test_a_pinned_version_may_be_a_folder() -> None:
    choice = choose_target(pointer(100), device_id="d", blocklist=[], pin_version="7")
    assert choice.target == model_target_path(STATE_MODEL, "7")
    assert choice.fallback == model_target_path(STATE_MODEL, "7", "onnx-genai")
