"""Check edgert's memory model (edgert/memory_model.py) against measured RSS of ``edgert serve``.

For each model x setting: start ``edgert serve`` on a Unix socket with the setting as ``EDGERT_ENGINE__*``
variables, wait for /ready, run one short chat generation (8 tokens), then read the daemon's peak RSS
(``VmHWM`` in /proc/<pid>/status, so a page touched once during load or generation counts) and its RSS now,
and print them beside the model's prediction for the same file and settings. Run it under the shared
benchmark lock::

    flock /tmp/edgert-bench.lock .venv/bin/python benchmarks/memory_model_check.py \\
        --gemma3 /path/gemma-3-270m.Q4_K_M.gguf --e2b ~/.cache/edgert-bench/gemma-4-E2B-shape-Q4_K_M.gguf

Prints a Markdown table (the one in benchmarks/RESULTS.md). With ``--drafter`` (and ``--e2b``) it measures
instead what loading that MTP drafter beside the model adds, against the memory model's drafter part.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from edgert.gguf_file import read_layout
from edgert.memory_model import drafter_shape, estimate, estimate_file, machine_repack, shape_of
from edgert.settings import EngineSettings

EDGERT = str(Path(sys.executable).with_name("edgert"))
MIB = 1024 * 1024

#: (label, engine settings) measured for every model; the first is edgert's default.
SETTINGS: tuple[tuple[str, dict[str, object]], ...] = (
    ("default (lazy auto, repack on, f16 KV)", {}),
    ("lazy on", {"lazy_embeddings": "on"}),
    ("lazy on, repack off", {"lazy_embeddings": "on", "weight_repack": False}),
    ("repack off, KV q8_0", {"weight_repack": False, "kv_cache_type": "q8_0"}),
    ("ctx 16384", {"n_ctx": 16384}),
)
#: Settings the model's measured constants were not fitted on (held out).
HELD_OUT: tuple[tuple[str, dict[str, object]], ...] = (
    ("held out: 1 slot, no prefix cache, ctx 8192", {"n_parallel": 1, "prefix_cache_entries": 0, "n_ctx": 8192}),
    ("held out: private KV per slot (kv_unified off)", {"kv_unified": False}),
    ("held out: no mmap", {"use_mmap": False}),
    ("held out: lazy on, no mmap", {"lazy_embeddings": "on", "use_mmap": False}),
)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(model: Path, overrides: dict[str, object], workdir: Path) -> tuple[int, int]:
    """(peak RSS, RSS after the generation) of ``edgert serve`` in MiB."""
    sock = workdir / "edgert.sock"
    env = dict(os.environ)
    # booleans as TOML/env spell them; paths (a drafter) exactly as given
    env.update({f"EDGERT_ENGINE__{key.upper()}": _env_value(value) for key, value in overrides.items()})
    env.update(
        {
            "EDGERT_STATE_DIR": str(workdir / "state"),
            "EDGERT_ENGINE__N_THREADS": "2",
            "EDGERT_ENGINE__PREFIX_CACHE_PERSIST": "false",
            "EDGERT_MQTT__BROKER": "",
        }
    )
    with (workdir / "serve.log").open("ab") as log:
        proc = subprocess.Popen(
            [EDGERT, "serve", "--socket", str(sock), "--model", str(model), "--no-mmproj"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: we stop exactly what we started
        )
    try:
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://edgert", timeout=120) as client:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"edgert serve exited with {proc.returncode}; see {workdir / 'serve.log'}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/ready").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("not ready after 300 s")
                time.sleep(0.05)
            body = {"messages": [{"role": "user", "content": "Write one sentence about the sea."}], "max_tokens": 8}
            client.post("/v1/chat/completions", json=body).raise_for_status()
        return status_kib(proc.pid, "VmHWM") // 1024, status_kib(proc.pid, "VmRSS") // 1024
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _env_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def drafter_rows(model: Path, drafter: Path, repack: dict[str, int]) -> None:
    """What the MTP drafter adds: the same model measured without and with it, at 12 and at 1 sequence."""
    shape = shape_of(read_layout(model))
    draft = drafter_shape(drafter)
    for label, base in (("default", {}), ("1 slot, no prefix cache", {"n_parallel": 1, "prefix_cache_entries": 0})):
        peaks = []
        for overrides in (base, base | {"drafter": drafter, "speculative": "on"}):
            with tempfile.TemporaryDirectory(prefix="edgert-mem-") as tmp:
                peaks.append(measure(model, overrides, Path(tmp))[0])
        engine = EngineSettings.model_validate(base | {"multimodal": False, "drafter": drafter})
        predicted = estimate(shape, engine, repack=repack, drafter=draft).drafter_mib
        added = peaks[1] - peaks[0]
        print(f"| {drafter.name} | {label} | {predicted} | {added} ({peaks[0]} -> {peaks[1]}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gemma3", type=Path, help="Gemma 3 270M Q4_K_M GGUF")
    parser.add_argument("--e2b", type=Path, help="shape-exact Gemma 4 E2B Q4_K_M GGUF")
    parser.add_argument("--e4b", type=Path, help="shape-exact Gemma 4 E4B Q4_K_M GGUF")
    parser.add_argument("--drafter", type=Path, help="with --e2b: measure only what this MTP drafter GGUF adds")
    args = parser.parse_args()
    if args.drafter is not None:
        print("| drafter | setting | predicted drafter MiB | measured: peak RSS added MiB |")
        print("|---|---|---|---|")
        drafter_rows(args.e2b, args.drafter, machine_repack())
        return
    models = [(name, path) for name, path in (("270M", args.gemma3), ("E2B", args.e2b), ("E4B", args.e4b)) if path]
    repack = machine_repack()
    print(f"repack rules for this CPU: {repack}; load average {os.getloadavg()[0]:.2f}\n")
    print("| model | setting | predicted MiB | peak RSS MiB | RSS after MiB | error vs peak |")
    print("|---|---|---|---|---|---|")
    for name, path in models:
        for label, overrides in SETTINGS + HELD_OUT:
            engine = EngineSettings.model_validate(overrides | {"multimodal": False})
            predicted = estimate_file(path, engine, repack=repack).total_mib
            with tempfile.TemporaryDirectory(prefix="edgert-mem-") as tmp:
                peak, after = measure(path, overrides, Path(tmp))
            error = (predicted - peak) / peak
            print(f"| {name} | {label} | {predicted} | {peak} | {after} | {error:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
