#!/usr/bin/env bash
# The hook benchmark on a CUDA GPU (issue 9, deliverable 5): the ResNet-18 audio-visual step of
# the official InfoReg code - batch 64, audio 1x257x188, visual 3x224x224 - plain against the
# hook (official and paper, window open and closed, in-process and through `regulator serve`),
# interleaved, as `python -m bench.hook_step` does on the CPU; stopped after 290 s in any case.
# Not run on a GPU yet (this project's machines have none).
#
#   bench/device.sh              # float32
#   bench/device.sh bf16         # the forward pass under torch.autocast(bfloat16)
#
# Needs a CUDA build of torch in the interpreter it runs (PY=..., default .venv/bin/python).
# FRAMES=3 feeds three frames per clip, as the official code's --fps 3; ROUNDS, BLOCK tune the
# measurement. Writes results/bench_cuda[_bf16].json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
AMP=${1:-}
case "$AMP" in ""|bf16|fp16) ;; *) echo "usage: bench/device.sh [bf16|fp16]" >&2; exit 2;; esac
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/device.sh: no CUDA device visible to torch " + torch.__version__)'
args=(--workload av --device cuda --batch 64 --image 224 --frames "${FRAMES:-1}" --threads 4
      --rounds "${ROUNDS:-10}" --block "${BLOCK:-8}" --warmup 2 --json "results/bench_cuda${AMP:+_$AMP}.json")
if [ -n "$AMP" ]; then args+=(--amp "$AMP"); fi
exec timeout 290 "$PY" -m bench.hook_step "${args[@]}"
