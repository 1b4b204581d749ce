#!/usr/bin/env bash
# Build the llama.cpp command-line tools (llama-server, llama-bench,
# llama-batched-bench, llama-quantize, llama-cli) from the llama.cpp source
# that is vendored in the llama-cpp-python sdist, so the tools run exactly the
# same ggml/llama.cpp code as the Python bindings edgert uses.
#
# Usage:
#   benchmarks/build_llama_tools.sh                       # CPU, Release
#   CMAKE_ARGS="-DGGML_CUDA=on" benchmarks/build_llama_tools.sh   # separate build dir
#   BIN=$(benchmarks/build_llama_tools.sh | tail -n1)     # last line = bin dir
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  sdist version to build       (default 0.3.36)
#   EDGERT_BENCH_CACHE        cache/output dir             (default ${XDG_CACHE_HOME:-$HOME/.cache}/edgert-bench)
#   LLAMA_CPP_PYTHON_SDIST    optional path to an already downloaded sdist
#                             (.tar.gz) to use instead of `pip download`
#   CMAKE_ARGS                extra cmake configure args; a non-empty value
#                             selects its own build dir (build-<hash>)
#   PYTHON                    interpreter used for `pip download` (default python3)
#   JOBS                      parallel build jobs (default: nproc)
#   FORCE=1                   rebuild even if the binaries already exist
#
# The build is offline once the sdist is present: no curl, no OpenSSL, no
# web-UI download (LLAMA_OPENSSL=OFF, LLAMA_BUILD_UI=OFF,
# LLAMA_USE_PREBUILT_UI=OFF; LLAMA_CURL no longer exists in this llama.cpp).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE_DIR="${EDGERT_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgert-bench}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
EXTRA_CMAKE_ARGS="${CMAKE_ARGS:-}"
FORCE="${FORCE:-0}"

TARGETS=(llama-server llama-bench llama-batched-bench llama-quantize llama-cli)

log() { echo "[build_llama_tools] $*" >&2; }

SDIST_DIR="$CACHE_DIR/sdist"
SRC_ROOT="$CACHE_DIR/src/llama_cpp_python-$VERSION"
LLAMA_SRC="$SRC_ROOT/vendor/llama.cpp"

if [[ -n "$EXTRA_CMAKE_ARGS" ]]; then
    variant="$(printf '%s' "$EXTRA_CMAKE_ARGS" | sha256sum | cut -c1-10)"
    BUILD_DIR="$CACHE_DIR/build/llama.cpp-$VERSION-$variant"
else
    BUILD_DIR="$CACHE_DIR/build/llama.cpp-$VERSION-cpu"
fi
BIN_DIR="$BUILD_DIR/bin"
STAMP="$BUILD_DIR/.edgert-build-stamp"
STAMP_CONTENT="version=$VERSION cmake_args=$EXTRA_CMAKE_ARGS"

all_built() {
    local t
    [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$STAMP_CONTENT" ]] || return 1
    for t in "${TARGETS[@]}"; do
        [[ -x "$BIN_DIR/$t" ]] || return 1
    done
}

if [[ "$FORCE" != "1" ]] && all_built; then
    log "binaries for llama-cpp-python $VERSION already built in $BIN_DIR (FORCE=1 to rebuild)"
    echo "$BIN_DIR"
    exit 0
fi

# 1. obtain the sdist -------------------------------------------------------
mkdir -p "$SDIST_DIR" "$CACHE_DIR/src"
tarball="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
if [[ -n "${LLAMA_CPP_PYTHON_SDIST:-}" ]]; then
    tarball="$LLAMA_CPP_PYTHON_SDIST"
    log "using provided sdist $tarball"
elif [[ ! -f "$tarball" ]]; then
    log "downloading llama-cpp-python==$VERSION sdist into $SDIST_DIR"
    "$PYTHON" -m pip download --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$SDIST_DIR" >&2
fi
[[ -f "$tarball" ]] || { log "sdist not found: $tarball"; exit 1; }

# 2. unpack -------------------------------------------------------------------
if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    log "unpacking $tarball"
    tmp_unpack="$(mktemp -d "$CACHE_DIR/src/.unpack.XXXXXX")"
    trap 'rm -rf "$tmp_unpack"' EXIT
    tar -xzf "$tarball" -C "$tmp_unpack"
    top="$(find "$tmp_unpack" -mindepth 1 -maxdepth 1 -type d | head -n1)"
    [[ -f "$top/vendor/llama.cpp/CMakeLists.txt" ]] \
        || { log "no vendor/llama.cpp in sdist"; exit 1; }
    rm -rf "$SRC_ROOT"
    mv "$top" "$SRC_ROOT"
fi

# 3. configure + build -------------------------------------------------------
log "configuring $BUILD_DIR"
generator=()
if command -v ninja >/dev/null 2>&1; then
    generator=(-G Ninja)
fi
# shellcheck disable=SC2206  # CMAKE_ARGS is intentionally word-split
extra=($EXTRA_CMAKE_ARGS)
start=$(date +%s)
cmake -S "$LLAMA_SRC" -B "$BUILD_DIR" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    "${extra[@]}" >&2

log "building ${TARGETS[*]} with $JOBS jobs"
cmake --build "$BUILD_DIR" --config Release -j "$JOBS" --target "${TARGETS[@]}" >&2
end=$(date +%s)

for t in "${TARGETS[@]}"; do
    [[ -x "$BIN_DIR/$t" ]] || { log "missing binary $BIN_DIR/$t"; exit 1; }
done
printf '%s' "$STAMP_CONTENT" > "$STAMP"
log "built in $((end - start)) s"
echo "$BIN_DIR"
