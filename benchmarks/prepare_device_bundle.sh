#!/usr/bin/env bash
# Prepare what the GPU machine needs but cannot download, in one folder git ignores (default
# .bundle/): a trimmed llama-cpp-python sdist to build there with CUDA, the wheels of Python
# packages its image lacks, and a vocabulary-only GGUF of SmolLM2 for the generated models.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.bundle}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out/wheels"
grep -qx "/$out/" .git/info/exclude 2>/dev/null || echo "/$out/" >> .git/info/exclude

if [ ! -f "$out/llama-cpp-python-$version.tar.gz" ]; then
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-$version.tar.gz -C "$tmp"
  src="$tmp/llama_cpp_python-$version"
  rm -rf "$src"/{.git,.github,examples,docker}
  v="$src/vendor/llama.cpp"
  rm -rf "$v"/{models,docs,benches,tests,examples,conversion,scripts,tools/ui,tools/server,media,gguf-py,.github}
  for b in metal sycl vulkan opencl hexagon cann musa webgpu zdnn rpc et kompute zendnn virtgpu openvino; do
    rm -rf "$v/ggml/src/ggml-$b"
  done
  tar -czf "$out/llama-cpp-python-$version.tar.gz" -C "$tmp" "llama_cpp_python-$version"
  rm -rf "$tmp"
fi

"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$out/wheels" gguf diskcache

# the tokenizer of SmolLM2 (49152 tokens) without its weights
"$py" - "$out/smollm2-vocab.gguf" <<'PY'
import sys
from gguf import GGUFWriter
from pipellm_core.gguf.default_model import default_model_path
from pipellm_core.gguf.synthetic import copy_tokenizer
w = GGUFWriter(sys.argv[1], "llama")
copy_tokenizer(w, default_model_path())
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file(); w.close()
PY
du -sh "$out"
