#!/usr/bin/env bash
# The serving benchmark of `pipellm serve` against llama-server in one run on a fresh GPU
# machine: set-up with llama-server in the llama.cpp build and only the two models it needs,
# then serve_compare.py on each (1, 8, 32 and 64 clients; the smaller model first, so that its
# rows are written even if the run is cut short). Needs the bundle of prepare_device_bundle.sh.
#
#   serve_session.sh BUNDLE [serve_compare.py flags]   (--slots 64: one start of each server per model)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run() { bash "$here/device_run.sh" "$@"; }
m=${PIPELLM_DEVICE_WORK:-/tmp/pipellm}
export OUT=${OUT:-/tmp/out}
bundle=$1; shift
run setup-server "$bundle" smollm2-135m-q4_1 llama-8b-q4_0
run wait || exit 1
run serve-bench serve-smollm2-135m-q4_1 $m/smollm2-135m-q4_1.gguf --label "SmolLM2-135M shape Q4_1" "$@"
run serve-bench serve-llama-8b-q4_0 $m/llama-8b-q4_0.gguf --label "Llama-8B shape Q4_0" "$@"
