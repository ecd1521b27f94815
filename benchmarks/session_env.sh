# What the device session scripts (kernels_session.sh, models_session.sh) share; sourced.
here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
run() { bash "$here/device_run.sh" "$@"; }
m=${PIPELLM_DEVICE_WORK:-/tmp/pipellm}
export OUT=${OUT:-/tmp/out}
export PIPELLM_TEST_VOCAB=$m/smollm2-vocab.gguf
BUNDLE=${BUNDLE:-.bundle}
bench() {  # NAME LABEL FILE BATCHES [extra bench flags]: pipellm with and without graphs, and llama.cpp
  local name=$1 label=$2 file=$3 batches=$4; shift 4
  run bench "$name" -m "$file" --label "$label" --ablate "none;graphs" -b "$batches" -n 48 --repeats 2 "$@"
}
