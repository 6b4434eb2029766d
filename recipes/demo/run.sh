#!/usr/bin/env bash
# Build the bundled demo model from scratch with llavakit's own commands, timing each stage.
# Usage: bash recipes/demo/run.sh   (from the repository root, after `make setup`)
set -euo pipefail
W=${W:-work/demo}
PY=.venv/bin/python
LLAVAKIT=.venv/bin/llavakit
stage() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name: $((SECONDS - t0)) s" | tee -a "$W/timings.txt"; }
mkdir -p "$W"; : > "$W/timings.txt"
stage "data" $PY recipes/demo/make_data.py --out "$W/data"
stage "vision tower pretraining" $PY recipes/demo/pretrain_vision.py --out "$W/tower" --steps 4500 --layers 6 --hidden 192 --fashion-batch 128
stage "projector word alignment" $PY recipes/demo/align_projector.py --tower "$W/tower" --out "$W/align"
stage "stage 1 (projector alignment)" $LLAVAKIT train recipes/demo/stage1.yaml
stage "stage 2 (visual instruction tuning, LoRA)" $LLAVAKIT train recipes/demo/stage2.yaml
stage "package" $PY recipes/demo/package.py --run "$W/stage2" --tower "$W/tower"
stage "evaluate" $PY recipes/demo/evaluate.py --model demo --out "$W/eval"
cat "$W/timings.txt"
