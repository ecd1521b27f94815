#!/usr/bin/env bash
# One warm GPU machine over six calls, each carrying one piece of the real model files
# (prepare_device_models.sh): the server benchmark, the new architectures' rows (the real
# Gemma 3 270M among them), the GPU tests and the CUDA fidelity figures. Each step ends within
# ten minutes; run them in order, one call each, with no pause that lets the machine go back.
#
#   models_session.sh one      (carry .bundle and .models/1) set-up with llama-server and the
#                              random-weight models; the kernels' GPU tests during the build;
#                              the float32 fidelity probe (f32_fidelity_probe.py)
#   models_session.sh two      (.models/2) `pipellm serve` against llama-server, SmolLM2 shape
#                              and Llama-8B Q4_0 (serve_compare.py, one start per server)
#   models_session.sh three    (.models/3) the other GPU tests; `pipellm compare --device cuda`
#                              on the real SmolLM2
#   models_session.sh four     (.models/4) 8B Q4_0 at batch 1, 8, 32 and the Qwen3-8B shape at
#                              1 and 32 against llama.cpp
#   models_session.sh five     (.models/5) the SmolLM2 shape at batch 1, 8, 32
#   models_session.sh six      (.models/6) the real Gemma 3 270M at batch 1 and 32, and its
#                              tests against llama.cpp run where CUDA is the default device
set -uo pipefail
source "$(dirname "$0")/session_env.sh"
case $1 in
one)
  run setup-server "$BUNDLE" smollm2-135m-q4_1 llama-8b-q4_0 qwen3-8b-q4_k_m
  run model .models/1
  timeout 260 bash "$here/device_run.sh" tests tests/model
  run wait || exit 1
  timeout 150 bash "$here/device_run.sh" py benchmarks/f32_fidelity_probe.py --vocab "$m/smollm2-vocab.gguf" \
    --json "$OUT/f32_fidelity_probe.json" | tee "$OUT/f32_fidelity_probe.txt"
  ;;
two)
  run model .models/2
  run serve-bench serve-smollm2-135m-q4_1 $m/smollm2-135m-q4_1.gguf --label "SmolLM2-135M shape Q4_1" --slots 64
  run serve-bench serve-llama-8b-q4_0 $m/llama-8b-q4_0.gguf --label "Llama-8B shape Q4_0" --slots 64
  ;;
three)
  run model .models/3
  timeout 300 bash "$here/device_run.sh" tests tests/plugins tests/llamacpp
  timeout 120 bash "$here/device_run.sh" py -m pipellm_core.frontends.cli compare --device cuda \
    | tee "$OUT/compare_cuda.txt" | tail -8
  ;;
four)
  run model .models/4
  bench llama-8b-q4_0 "Llama-8B shape Q4_0" $m/llama-8b-q4_0.gguf 1,8,32
  bench qwen3-8b-q4_k_m "Qwen3-8B shape Q4_K_M mix" $m/qwen3-8b-q4_k_m.gguf 1,32
  ;;
five)
  run model .models/5
  bench smollm2-135m-q4_1 "SmolLM2-135M shape Q4_1" $m/smollm2-135m-q4_1.gguf 1,8,32
  ;;
six)
  run model .models/6
  bench gemma3-270m-real "Gemma 3 270M Q4_K_M (the released file)" $m/real/gemma-3-270m-q4_k_m.gguf 1,32
  (cd "$here/.." && PYTHONPATH=$m/site:$m/llama/python:$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/llamacpp/test_gemma3_270m.py 2>&1 | tail -15 | tee "$OUT/gemma3_tests_cuda.txt")
  ;;
esac
