#!/usr/bin/env bash
# The kernels issue's measurements on one GPU machine, in steps that each finish within ten
# minutes (one, two, three, f16-prefetch, on the same machine), and the new architectures' rows
# in one step of their own (four). Needs the bundle of prepare_device_bundle.sh.
#
#   kernels_session.sh one BUNDLE   set-up (llama.cpp builds and the models are written in the
#                                   background), the kernels' GPU tests, the K-quant products
#                                   probed alone, every product timed (the Q4 products' tiles
#                                   come from the committed table; `kernel_probe_q32.py --sweep`
#                                   measures a new one)
#   kernels_session.sh two PART     (set-up again where the machine is fresh: BUNDLE=.bundle) the
#                                   K-quant tile sweep (its table serves the later benches),
#                                   the Q4_K_M products timed, 8B Q4_K_M against llama.cpp
#   kernels_session.sh three PART   8B Q4_0, the Gemma 3 270M and Qwen3-8B shapes against
#                                   llama.cpp; the other GPU tests and the CUDA fidelity figures
#                                   on the real SmolLM2
#   kernels_session.sh f16-prefetch PART  8B F16 against llama.cpp; 8B Q4_0 with 16 of 32
#                                   layers resident against llama.cpp at 16 GPU layers
#   kernels_session.sh four BUNDLE  on a bare machine: set-up with only its two models, then the
#                                   Gemma 3 270M and Qwen3-8B shapes (Q4_K_M mix) at batch 1 and
#                                   32 against llama.cpp, with the package's tile table
# PART: a piece folder of the real model files (prepare_device_models.sh, device_run.sh model);
# SmolLM2 is in place once .models/1 and .models/2 have both been carried.
set -uo pipefail
source "$(dirname "$0")/session_env.sh"
[ -f $m/k_tiles.json ] && export PIPELLM_K_TILES=$m/k_tiles.json
case $1 in
one)
  run setup "$2" smollm2-135m-q4_1 llama-8b-q4_0 llama-8b-q4_k_m llama-8b-f16 gemma3-270m-q4_k_m qwen3-8b-q4_k_m
  timeout 260 bash "$here/device_run.sh" tests tests/model/test_k_products.py tests/model/test_q32_products.py \
    tests/model/test_norm.py tests/model/test_fused_decode.py tests/model/test_kernels.py \
    tests/model/test_decode_attention.py
  timeout 120 bash "$here/device_run.sh" py benchmarks/kernel_probe_k.py --json "$OUT/probe_k.json" --types Q4_K,Q6_K \
    --m 1,8,32 | tee "$OUT/probe_k.txt"
  timeout 150 bash "$here/device_run.sh" py benchmarks/kernels.py --json "$OUT/kernels.json" | tee "$OUT/kernels.txt" | tail -40
  ;;
two)
  run setup "$BUNDLE" llama-8b-q4_k_m llama-8b-q4_0 gemma3-270m-q4_k_m qwen3-8b-q4_k_m
  run model "$2"
  timeout 260 bash "$here/device_run.sh" py benchmarks/kernel_probe_k.py --sweep --budget 4 --tiles $m/k_tiles.json \
    | tee "$OUT/sweep_k.txt"
  if [ -f $m/k_tiles.json ]; then cp $m/k_tiles.json "$OUT/k_tiles.json"; export PIPELLM_K_TILES=$m/k_tiles.json; fi
  timeout 60 bash "$here/device_run.sh" py benchmarks/kernels.py --models llama-8b-q4_k_m --batches 1,8,32 \
    --json "$OUT/kernels_q4_k_m.json" | tee "$OUT/kernels_q4_k_m.txt" | tail -20
  run wait || exit 1
  bench llama-8b-q4_k_m "Llama-8B shape Q4_K_M mix" $m/llama-8b-q4_k_m.gguf 1,8,32
  ;;
three)
  run model "$2"
  run wait || exit 1
  bench llama-8b-q4_0 "Llama-8B shape Q4_0" $m/llama-8b-q4_0.gguf 1,8,32
  bench gemma3-270m-q4_k_m "Gemma 3 270M shape Q4_K_M mix, Gemma 3 tokenizer" $m/gemma3-270m-q4_k_m.gguf 1,32
  bench qwen3-8b-q4_k_m "Qwen3-8B shape Q4_K_M mix" $m/qwen3-8b-q4_k_m.gguf 1,32
  timeout 150 bash "$here/device_run.sh" tests tests/plugins tests/runtime tests/llamacpp
  run py -m pipellm_core.frontends.cli compare --device cuda 2>&1 | tee "$OUT/compare_cuda.txt" | tail -8
  ;;
f16-prefetch)
  run model "$2"
  run wait || exit 1
  bench llama-8b-f16 "Llama-8B shape F16" $m/llama-8b-f16.gguf 1,8,32
  run bench llama-8b-q4_0-prefetch -m $m/llama-8b-q4_0.gguf \
    --label "Llama-8B shape Q4_0, 16 of 32 layers resident" --ablate "prefetch,graphs" \
    -O prefetch.resident_layers=16 --baseline-gpu-layers 16 -b 1,8,32 -n 32 --repeats 2
  ;;
four)
  unset PIPELLM_K_TILES PIPELLM_Q32_TILES  # the tables shipped with the package
  run setup "$2" gemma3-270m-q4_k_m qwen3-8b-q4_k_m
  run wait || exit 1
  bench gemma3-270m-q4_k_m "Gemma 3 270M shape Q4_K_M mix, Gemma 3 tokenizer" $m/gemma3-270m-q4_k_m.gguf 1,32
  bench qwen3-8b-q4_k_m "Qwen3-8B shape Q4_K_M mix" $m/qwen3-8b-q4_k_m.gguf 1,32
  ;;
esac