#!/usr/bin/env bash
# A short, prepared GPU check for a machine with an NVIDIA GPU (run from the repository root):
#   1. installs and builds as `make build` does (torch 2.13.0 wheels carry CUDA),
#   2. times the bimodal step at 224 px, batch 32, in site-node (tch, CUDA) and PyTorch eager,
#   3. runs one federated round at 224 px, batch 32 with two CUDA site-nodes on loopback mTLS.
# Prints a small table; everything lands in out/gpu-check/. Total well under 10 minutes on an H100/H200.
set -euo pipefail
OUT="${GPU_CHECK_OUT:-out/gpu-check}"
rm -rf "$OUT"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
make build >"$OUT/build.log" 2>&1
CACHE="${CACHE:-$HOME/.cache/alnfl}"
TARGET="${CARGO_TARGET_DIR:-$CACHE/target}"
BIN="$TARGET/debug"
PY="$CACHE/venv/bin/python"
export LD_LIBRARY_PATH="$(ls -d "$CACHE"/venv/lib/python3*/site-packages/torch/lib):${LD_LIBRARY_PATH:-}"

echo "== step time, 224 px, batch 32"
"$BIN/site-node" bench-step --device cuda --image-size 224 --batch 32 --steps 10 | tee "$OUT/tch.json"
PYTHONWARNINGS=ignore "$PY" deploy/bench_torch_step.py --image-size 224 --batch 32 --steps 10 | tee "$OUT/torch.json"
echo "== the same with CUDA autocast (fp16) in site-node"
"$BIN/site-node" bench-step --device cuda --autocast --image-size 224 --batch 32 --steps 10 | tee "$OUT/tch_autocast.json"

echo "== one federated round, 2 CUDA sites, 224 px, batch 32"
"$BIN/site-node" synth --sites 2 --patients 200 --image-px 256 --out "$OUT/cohort" 2>/dev/null
"$BIN/coordinator" provision --sites site-a,site-b --out "$OUT/pki" 2>/dev/null
"$BIN/site-node" init-model --out "$OUT/pki/coordinator/initial_model.safetensors" 2>/dev/null
cfg="$OUT/pki/coordinator/coordinator.toml"
sed -i 's/^listen = .*/listen = "127.0.0.1:0"/; s/^rounds = .*/rounds = 1/; s/^local_steps = .*/local_steps = 20/; s/^batch_size = .*/batch_size = 32/; s/^image_size = .*/image_size = 224/' "$cfg"
"$BIN/coordinator" run --config "$cfg" --addr-file "$OUT/addr" >"$OUT/results.txt" 2>"$OUT/coordinator.log" &
coord=$!
for _ in $(seq 100); do [ -s "$OUT/addr" ] && break; sleep 0.1; done
for s in site-a site-b; do
  "$BIN/site-node" run --device cuda --config "$OUT/pki/sites/$s/site.toml" --coordinator "https://$(cat "$OUT/addr")" \
    --manifest "$OUT/cohort/$s/manifest.csv" --work-dir "$OUT/sites/$s" 2>"$OUT/$s.log" &
done
wait "$coord"
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
t, p = json.load(open(f"{out}/tch.json")), json.load(open(f"{out}/torch.json"))
print(f"step 224px b32: tch {t['train_step_s']:.4f} s, PyTorch {p['train_step_s']:.4f} s, ratio {t['train_step_s']/p['train_step_s']:.2f}; "
      f"throughput {32/t['train_step_s']:.0f} vs {32/p['train_step_s']:.0f} samples/s")
rep = json.load(open(f"{out}/pki/coordinator/state/report.json"))
for s in ("site-a", "site-b"):
    for line in open(f"{out}/sites/{s}/timings.jsonl"):
        r = json.loads(line)
        print(f"{s} round {r['round']}: pull {r['pull_s']:.2f} s, 20 local steps {r['train_s']:.2f} s, push {r['push_s']:.2f} s")
r = rep["rounds"][0]
print(f"coordinator: round wall {r['duration_s']:.2f} s, aggregate {r['aggregate_s']:.3f} s, checkpoint {r['checkpoint_s']:.3f} s")
PY
