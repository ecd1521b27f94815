#!/usr/bin/env bash
# The kernels issue's measurements on one GPU machine, in two calls of under ten minutes each
# (the second on the same, still warm machine). Needs the bundle of prepare_device_bundle.sh.
#
#   kernels_session.sh one BUNDLE   GPU tests, every product timed alone (benchmarks/kernels.py),
#                                   then SmolLM2 and 8B Q4_0 against llama.cpp
#   kernels_session.sh two          8B Q4_K_M and F16 against llama.cpp; 8B Q4_0 with 16 of 32
#                                   layers resident against llama.cpp at 16 GPU layers
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run() { bash "$here/device_run.sh" "$@"; }
m=/tmp/pipellm
export PIPELLM_TEST_VOCAB=$m/smollm2-vocab.gguf
case $1 in
one)
  run setup "$2"
  timeout 240 bash "$here/device_run.sh" tests tests/model tests/plugins tests/runtime tests/sim tests/hooks
  run py benchmarks/kernels.py --json "$OUT/kernels.json" | tee "$OUT/kernels.txt" | tail -40
  run wait
  run bench smollm2-135m-q4_1 -m $m/smollm2-135m-q4_1.gguf --label "SmolLM2-135M shape Q4_1" \
    --ablate graphs -b 1,8,32 -n 64 --repeats 2
  run bench llama-8b-q4_0 -m $m/llama-8b-q4_0.gguf --label "Llama-8B shape Q4_0" \
    --ablate graphs -b 1,8,32 -n 64 --repeats 2
  ;;
two)
  run wait
  run bench llama-8b-q4_k_m -m $m/llama-8b-q4_k_m.gguf --label "Llama-8B shape Q4_K_M mix" \
    --ablate graphs -b 1,8,32 -n 64 --repeats 2
  run bench llama-8b-f16 -m $m/llama-8b-f16.gguf --label "Llama-8B shape F16" \
    --ablate graphs -b 1,8,32 -n 64 --repeats 2
  run bench llama-8b-q4_0-prefetch -m $m/llama-8b-q4_0.gguf \
    --label "Llama-8B shape Q4_0, 16 of 32 layers resident" --ablate "prefetch,graphs" \
    -O prefetch.resident_layers=16 --baseline-gpu-layers 16 -b 1,8,32 -n 32 --repeats 2
  ;;
esac
