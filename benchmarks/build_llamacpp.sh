#!/usr/bin/env bash
# One build of the llama.cpp vendored in the llama-cpp-python sdist for both of its users here:
# llama-server (the baseline of benchmarks/serve_bench.py) and the shared libraries that the
# sdist's Python package `llama_cpp` loads from its lib/ folder (the baseline of `pipellm bench`).
# The package is pure Python over those libraries, so it is copied next to them instead of
# being built a second time by pip.
#
#   build_llamacpp.sh SDIST_DIR OUT_DIR [CMAKE_ARGS...]
#
# OUT_DIR/build/bin holds llama-server and the libraries, OUT_DIR/python the package (put it on
# PYTHONPATH); OUT_DIR/build.done marks the end. CMAKE_ARGS choose the backend, e.g.
# -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90a -DGGML_NATIVE=off. LLAMA_TARGETS: what to build
# (default "llama llama-server"; "llama" alone gives the libraries), JOBS: parallel jobs.
set -euo pipefail
src=$(cd "$1" && pwd)
mkdir -p "$2" && out=$(cd "$2" && pwd)
shift 2
started=$(date +%s)
cmake -S "$src/vendor/llama.cpp" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF "$@"
# shared: llama-server links the same libllama and ggml libraries as the package loads
cmake --build "$out/build" --target ${LLAMA_TARGETS:-llama llama-server} -j "${JOBS:-$(nproc)}"
rm -rf "$out/python" && mkdir -p "$out/python"
cp -r "$src/llama_cpp" "$out/python/"
rm -rf "$out/python/llama_cpp/lib" && ln -s "$out/build/bin" "$out/python/llama_cpp/lib"
echo "llama.cpp (${LLAMA_TARGETS:-llama llama-server}) built in $(( $(date +%s) - started )) s"
touch "$out/build.done"
