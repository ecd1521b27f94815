#!/usr/bin/env bash
# The kernels issue's measurements on one GPU machine, in three calls of under ten minutes each
# (each on the same, still warm machine), and the new architectures' rows in one call of their
# own. Needs the bundle of prepare_device_bundle.sh.
#
#   kernels_session.sh one BUNDLE   set-up (llama.cpp builds and the models are written in the
#                                   background), the kernels' GPU tests, the Q4 products' tile
#                                   sweep (its table serves the later calls), every product timed
#   kernels_session.sh two PART     SmolLM2, 8B Q4_0 and 8B Q4_K_M against llama.cpp
#   kernels_session.sh three PART   8B F16 against llama.cpp; 8B Q4_0 with 16 of 32 layers
#                                   resident against llama.cpp at 16 GPU layers; the other GPU
#                                   tests and the CUDA fidelity figures on the real SmolLM2
#   kernels_session.sh four BUNDLE  on a bare machine: set-up with only its two models, then the
#                                   Gemma 3 270M and Qwen3-8B shapes (Q4_K_M mix) at batch 1 and
#                                   32 against llama.cpp, with the package's tile table
# PART: a half of the real SmolLM2 file (device_run.sh model).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run() { bash "$here/device_run.sh" "$@"; }
m=/tmp/pipellm
export PIPELLM_TEST_VOCAB=$m/smollm2-vocab.gguf
export PIPELLM_Q32_TILES=$m/q32_tiles.json
bench() {  # NAME LABEL FILE [extra bench flags]; BATCHES overrides 1,8,32
  local name=$1 label=$2 file=$3; shift 3
  run bench "$name" -m "$m/$file" --label "$label" --ablate "none;graphs" -b "${BATCHES:-1,8,32}" -n 48 --repeats 2 "$@"
}
case $1 in
one)
  run setup "$2" smollm2-135m-q4_1 llama-8b-q4_0 llama-8b-q4_k_m llama-8b-f16
  timeout 150 bash "$here/device_run.sh" tests tests/model/test_q32_products.py tests/model/test_norm.py \
    tests/model/test_fused_decode.py tests/model/test_kernels.py
  run py benchmarks/kernel_probe_q32.py --json "$OUT/probe_q32.json" --rows 1,8,32 --models llama-8b-q4_0 \
    --sweep --budget 14 --tiles "$PIPELLM_Q32_TILES" | tee "$OUT/probe_q32.txt"
  cp "$PIPELLM_Q32_TILES" "$OUT/q32_tiles.json"
  run py benchmarks/kernels.py --json "$OUT/kernels.json" | tee "$OUT/kernels.txt" | tail -40
  ;;
two)
  run model "$2"
  run wait
  bench smollm2-135m-q4_1 "SmolLM2-135M shape Q4_1" smollm2-135m-q4_1.gguf
  bench llama-8b-q4_0 "Llama-8B shape Q4_0" llama-8b-q4_0.gguf
  bench llama-8b-q4_k_m "Llama-8B shape Q4_K_M mix" llama-8b-q4_k_m.gguf
  ;;
three)
  run model "$2"
  run wait
  bench llama-8b-f16 "Llama-8B shape F16" llama-8b-f16.gguf
  run bench llama-8b-q4_0-prefetch -m $m/llama-8b-q4_0.gguf \
    --label "Llama-8B shape Q4_0, 16 of 32 layers resident" --ablate "prefetch,graphs" \
    -O prefetch.resident_layers=16 --baseline-gpu-layers 16 -b 1,8,32 -n 32 --repeats 2
  timeout 200 bash "$here/device_run.sh" tests tests/plugins tests/runtime tests/llamacpp tests/model/test_k_products.py
  run py -m pipellm_core.frontends.cli compare --device cuda 2>&1 | tee "$OUT/compare_cuda.txt" | tail -8
  ;;
four)
  unset PIPELLM_Q32_TILES  # no sweep ran on this machine: the table shipped with the package
  run setup "$2" gemma3-270m-q4_k_m qwen3-8b-q4_k_m
  run wait || exit 1
  BATCHES=1,32 bench gemma3-270m-q4_k_m "Gemma 3 270M shape Q4_K_M mix, Gemma 3 tokenizer" gemma3-270m-q4_k_m.gguf
  BATCHES=1,32 bench qwen3-8b-q4_k_m "Qwen3-8B shape Q4_K_M mix" qwen3-8b-q4_k_m.gguf
  ;;
esac