"""Check edgert's decode-rate estimate (edgert/speed_fit.py) against llama-bench on the same machine.

Measures the memory bandwidth the way edgert does (no cache), then for each GGUF runs
``llama-bench -t 2 -p 0 -n 32 -r R`` (single stream, decode only) and prints the measured tok/s beside
:func:`edgert.speed_fit.decode_tok_s` for the file's bytes per token. Run it under the shared lock::

    BIN=$(benchmarks/build_llama_tools.sh | tail -n1)
    flock /tmp/edgert-bench.lock .venv/bin/python benchmarks/speed_fit_check.py --bin $BIN \\
        ~/.cache/edgert-bench/gemma-3-270m-Q4_K_M.gguf ~/.cache/edgert-bench/gemma-4-E2B-shape-Q4_K_M.gguf \\
        ~/.cache/edgert-bench/gemma-4-E4B-shape-Q4_K_M.gguf

With ``--fit`` it also prints the EFFICIENCY and TOKEN_OVERHEAD_S that a least-squares fit of
seconds/token = bytes / (EFFICIENCY x bandwidth) + overhead gives on the first two files (the calibration
pair; later files are held out). Prints a Markdown table (the one in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from edgert.gguf_file import read_layout
from edgert.memory_model import shape_of
from edgert.speed_fit import bytes_per_token, decode_tok_s, measure_bandwidth


def bench(binary: Path, model: Path, repeats: int) -> tuple[float, float]:
    """Mean and standard deviation of llama-bench's decode tok/s (2 threads, 32 tokens, no prompt)."""
    command = [str(binary / "llama-bench"), "-m", str(model), "-t", "2", "-p", "0", "-n", "32"]
    command += ["-r", str(repeats), "-o", "json"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    row = json.loads(out)[0]
    return float(row["avg_ts"]), float(row["stddev_ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--bin", type=Path, required=True, help="folder with llama-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit", action="store_true", help="fit the two constants on the first two models")
    args = parser.parse_args()

    bandwidth = measure_bandwidth()
    print(f"memory bandwidth (numpy copy, read + write): {bandwidth / 1e9:.1f} GB/s\n")
    rows = []
    for model in args.models:
        nbytes = bytes_per_token(shape_of(read_layout(model)))
        measured, spread = bench(args.bin, model, args.repeats)
        rows.append((model.name, nbytes, measured, spread))
    print("| model | MB read per token | measured tok/s | predicted tok/s | predicted / measured |")
    print("|---|---|---|---|---|")
    for name, nbytes, measured, spread in rows:
        predicted = decode_tok_s(nbytes, bandwidth)
        print(
            f"| {name} | {nbytes / 1e6:.0f} | {measured:.1f} ± {spread:.1f} | {predicted:.1f} | "
            f"{predicted / measured:.2f} |"
        )
    if args.fit and len(rows) >= 2:
        (_, b1, r1, _), (_, b2, r2, _) = rows[:2]
        effective = (b2 - b1) / (1 / r2 - 1 / r1)  # bytes/s: the slope of seconds per token over bytes
        overhead = 1 / r1 - b1 / effective
        print(f"\nfit: EFFICIENCY = {effective / bandwidth:.3f}, TOKEN_OVERHEAD_S = {overhead:.4f}")


if __name__ == "__main__":
    main()
