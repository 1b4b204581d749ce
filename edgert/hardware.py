"""What this machine has: CPU, RAM (cgroup limits included), NVIDIA GPUs and the backend to use.

:func:`detect` does the I/O (psutil, ``/proc``, cgroups, NVML) and returns a frozen
:class:`Hardware` value. A missing NVML library or driver is a note, never a crash. The pure
memory-fit rules that read that value live in :mod:`edgert.memory_fit`, apart from the I/O so
they can be tested without the hardware.

The inference library is not imported here: its :class:`BackendCapabilities` are passed in.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import psutil

from edgert.engine.base import BackendCapabilities

Severity = Literal["error", "warning", "info"]
BackendName = Literal["cuda", "metal", "cpu"]

MIB = 1024 * 1024

#: Entries of llama.cpp's CPU system_info that are build options, not instruction sets.
_NOT_SIMD = frozenset({"LLAMAFILE", "OPENMP", "REPACK", "KLEIDIAI", "ACCELERATE", "BLAS"})


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Problem:
    """Something the operator should know, with what to do about it."""

    severity: Severity
    message: str
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model: str
    physical_cores: int
    logical_cores: int
    #: instruction sets the llama.cpp build uses (from its system_info), e.g. ("AVX2", "AVX512")
    simd: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    vram_total_mib: int
    vram_free_mib: int


@dataclass(frozen=True, slots=True)
class Hardware:
    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, aarch64, arm64
    cpu: CpuInfo
    #: physical RAM, or the cgroup memory limit when that is lower (systemd MemoryMax=, containers)
    ram_total_mib: int
    ram_available_mib: int
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    #: the llama.cpp build can offload layers to a GPU (llama_supports_gpu_offload)
    build_gpu_offload: bool = False
    backend: BackendName = "cpu"
    notes: tuple[str, ...] = ()
    problems: tuple[Problem, ...] = ()

    @property
    def unified_memory(self) -> bool:
        return self.backend == "metal"


# --------------------------------------------------------------------------- detection (I/O)


def detect(caps: BackendCapabilities) -> Hardware:
    """Probe this machine. Never raises for missing GPUs, drivers or libraries."""
    system, machine = platform.system(), platform.machine()
    notes: list[str] = []
    problems: list[Problem] = []

    cpu = _detect_cpu(caps.system_info)
    vm = psutil.virtual_memory()
    ram_total = vm.total // MIB
    limit = cgroup_memory_limit_mib()
    if limit is not None and limit < ram_total:
        notes.append(f"memory limited by cgroup to {limit} MiB (of {ram_total} MiB physical)")
        ram_total = limit
    ram_available = min(vm.available // MIB, ram_total)

    gpus, driver, nvml_note = _probe_nvml()
    if nvml_note:
        notes.append(nvml_note)
    nvidia_present = bool(gpus) or _nvidia_driver_loaded()
    if nvidia_present and not gpus:
        problems.append(
            Problem(
                "warning",
                "an NVIDIA driver is loaded but NVML could not list the GPUs, so VRAM is unknown",
                "pip install 'edgert[cuda]' (nvidia-ml-py) and check nvidia-smi",
            )
        )

    backend = _backend(system, machine, nvidia_present, caps.gpu_offload)
    problems.extend(_backend_problems(system, machine, nvidia_present, caps))
    if caps.gpu_offload and backend == "cpu":
        notes.append("the llama.cpp build can offload to a GPU, but no usable GPU was found")

    return Hardware(
        system=system,
        machine=machine,
        cpu=cpu,
        ram_total_mib=ram_total,
        ram_available_mib=ram_available,
        gpus=gpus,
        driver_version=driver,
        build_gpu_offload=caps.gpu_offload,
        backend=backend,
        notes=tuple(notes),
        problems=tuple(problems),
    )


def _is_apple_silicon(system: str, machine: str) -> bool:
    return system == "Darwin" and machine == "arm64"


def _backend(system: str, machine: str, nvidia_present: bool, gpu_offload: bool) -> BackendName:
    if nvidia_present and gpu_offload:
        return "cuda"
    if _is_apple_silicon(system, machine) and gpu_offload:
        return "metal"
    return "cpu"


def _backend_problems(system: str, machine: str, nvidia_present: bool, caps: BackendCapabilities) -> list[Problem]:
    reinstall = "pip install --force-reinstall --no-cache-dir llama-cpp-python"
    if nvidia_present and not caps.gpu_offload:
        return [
            Problem(
                "warning",
                "an NVIDIA GPU is present but this llama-cpp-python build cannot offload to it: "
                "inference runs on the CPU",
                f'CMAKE_ARGS="-DGGML_CUDA=on" {reinstall}=={caps.version}',
            )
        ]
    if _is_apple_silicon(system, machine) and not caps.gpu_offload:
        return [
            Problem(
                "warning",
                "this Mac has a Metal GPU but the llama-cpp-python build cannot offload to it",
                f'CMAKE_ARGS="-DGGML_METAL=on" {reinstall}=={caps.version}',
            )
        ]
    return []


def parse_system_info(system_info: str) -> dict[str, dict[str, str]]:
    """``"CPU : SSE3 = 1 | AVX2 = 1 | CUDA : ARCHS = 890 |"`` -> ``{"CPU": {"SSE3": "1", ...}, ...}``."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in system_info.split("|"):
        item = raw.strip()
        if " : " in item:  # "CPU : SSE3 = 1" opens a new section
            name, item = (part.strip() for part in item.split(" : ", 1))
            current = sections.setdefault(name, {})
        if current is None or "=" not in item:
            continue
        key, value = (part.strip() for part in item.split("=", 1))
        current[key] = value
    return sections


def simd_flags(system_info: str) -> tuple[str, ...]:
    cpu = parse_system_info(system_info).get("CPU", {})
    return tuple(key for key, value in cpu.items() if value == "1" and key not in _NOT_SIMD)


def _detect_cpu(system_info: str) -> CpuInfo:
    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    return CpuInfo(
        model=_cpu_model(),
        physical_cores=physical,
        logical_cores=logical,
        simd=simd_flags(system_info),
    )


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """x86 says "model name", a Raspberry Pi says "Model", other ARM boards "Hardware"."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "model", "hardware", "cpu model"):
        if key in fields and not fields[key].isdigit():  # x86 "model : 17" is a number
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def cgroup_memory_limit_mib(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1 ``limit_in_bytes``).

    psutil reports physical RAM; under systemd ``MemoryMax=`` or in a container the kernel kills
    us at the cgroup limit instead, so that is the real total.
    """
    files = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:  # "0::/system.slice/edgert.service" (v2) or "4:memory:/docker/abc" (v1)
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].strip("/"):
            continue
        _, controllers, path = parts
        relative = path.strip("/")
        if controllers == "":
            files.insert(0, root / relative / "memory.max")
        elif "memory" in controllers.split(","):
            files.insert(0, root / "memory" / relative / "memory.limit_in_bytes")
    limits = [value for value in map(_read_limit, files) if value is not None]
    return min(limits) // MIB if limits else None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    # cgroup v2 says "max"; v1 says a huge page-rounded number when unlimited.
    if not text.isdigit() or int(text) >= 1 << 62:
        return None
    return int(text)


def _nvidia_driver_loaded() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def _probe_nvml() -> tuple[tuple[GpuInfo, ...], str | None, str | None]:
    """(GPUs, driver version, note). NVML absent or failing means no GPUs, with a note why."""
    try:
        import pynvml  # noqa: PLC0415 - optional dependency, loaded only when probing
    except ImportError:
        return (), None, "nvidia-ml-py is not installed, so NVIDIA GPUs were not probed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return (), None, f"no NVIDIA GPU: NVML unavailable ({exc})"
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = tuple(_nvml_gpu(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount()))
    except pynvml.NVMLError as exc:
        return (), None, f"NVML failed while listing GPUs ({exc})"
    finally:
        pynvml.nvmlShutdown()
    return gpus, driver, None


def _nvml_gpu(nvml: ModuleType, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        vram_total_mib=int(memory.total) // MIB,
        vram_free_mib=int(memory.free) // MIB,
    )


def _text(value: str | bytes) -> str:
    """Old nvidia-ml-py returns bytes, new returns str."""
    return value.decode() if isinstance(value, bytes) else value
