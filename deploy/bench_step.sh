#!/usr/bin/env bash
# The bimodal training step and feature extraction in site-node (tch) against the same model
# in PyTorch eager, same batch, image size and threads, in one run. Writes out/bench/step.json.
set -euo pipefail
BIN="${BIN:?folder with the site-node binary}"
PY="${PY:-python3}"
THREADS="${BENCH_THREADS:-2}"
mkdir -p out/bench
rows=()
for cfg in "64 8 5" "224 8 3"; do
  set -- $cfg
  tch=$("$BIN/site-node" bench-step --image-size "$1" --batch "$2" --steps "$3" --threads "$THREADS" --device cpu 2>/dev/null)
  torch=$(PYTHONWARNINGS=ignore "$PY" deploy/bench_torch_step.py --image-size "$1" --batch "$2" --steps "$3" --threads "$THREADS" 2>/dev/null)
  rows+=("$tch" "$torch")
done
printf '%s\n' "${rows[@]}" | "$PY" deploy/bench_step_table.py
