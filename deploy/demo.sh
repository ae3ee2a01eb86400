#!/usr/bin/env bash
# `make demo`: the whole federation on one machine, on loopback mTLS, results in out/demo/.
#   synthetic 3-site cohort → provisioning (CA + kits) → initial model → coordinator +
#   3 site-node processes → rounds → features → fusion SVM → report.json + results table.
# Sizes are chosen to fit 2 CPU cores; override with DEMO_* variables (the paper's recipe,
# 224 px / batch 32 / 5000 iterations, is a GPU configuration).
set -euo pipefail
BIN="${BIN:?set BIN to the folder holding the coordinator and site-node binaries}"
OUT="${DEMO_OUT:-out/demo}"
ROUNDS="${DEMO_ROUNDS:-3}"
STEPS="${DEMO_STEPS:-8}"
BATCH="${DEMO_BATCH:-8}"
IMAGE="${DEMO_IMAGE:-64}"
PATIENTS="${DEMO_PATIENTS:-584}"
SEED="${DEMO_SEED:-2020}"
# The paper's controls (US-only, SWE-only, ResNet50+C) and leave-one-site-out validation:
# six more federated trainings. DEMO_STUDY=false runs the main model alone.
STUDY="${DEMO_STUDY:-true}"
# Aggregation, compression and privacy (see [aggregation] and [privacy] in coordinator.toml).
STRATEGY="${DEMO_STRATEGY:-fedavg}"
CODEC="${DEMO_CODEC:-fp32}"
DP="${DEMO_DP:-off}"
CLIP="${DEMO_CLIP:-1.0}"
SIGMA="${DEMO_SIGMA:-1.0}"
SECAGG="${DEMO_SECAGG:-false}"
SITES=(site-a site-b site-c)

started=$(date +%s)
rm -rf "$OUT"
mkdir -p "$OUT/logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

echo "== 1/4 synthetic cohort: $PATIENTS patients over ${#SITES[@]} sites"
"$BIN/site-node" synth --sites "${#SITES[@]}" --patients "$PATIENTS" --seed "$SEED" --out "$OUT/cohort" 2>"$OUT/logs/synth.log"

echo "== 2/4 provisioning: consortium CA, coordinator certificate, one startup kit per site"
"$BIN/coordinator" provision --sites "$(IFS=,; echo "${SITES[*]}")" --out "$OUT/pki" 2>"$OUT/logs/provision.log"
"$BIN/site-node" init-model --out "$OUT/pki/coordinator/initial_model.safetensors" 2>"$OUT/logs/init-model.log"
cfg="$OUT/pki/coordinator/coordinator.toml"
sed -i "s/^share_gradcam = .*/share_gradcam = true/" "$OUT"/pki/sites/*/site.toml
sed -i "s/^leave_one_site_out = .*/leave_one_site_out = $STUDY/; s/^modality_controls = .*/modality_controls = $STUDY/; s/^clinical_in_head_control = .*/clinical_in_head_control = $STUDY/; s/^listen = .*/listen = \"127.0.0.1:0\"/; s/^rounds = .*/rounds = $ROUNDS/; s/^local_steps = .*/local_steps = $STEPS/; s/^batch_size = .*/batch_size = $BATCH/; s/^image_size = .*/image_size = $IMAGE/" "$cfg"
sed -i "s/^strategy = .*/strategy = \"$STRATEGY\"/; s/^update_codec = .*/update_codec = \"$CODEC\"/; s/^dp = .*/dp = \"$DP\"/; s/^clip_norm = .*/clip_norm = $CLIP/; s/^noise_multiplier = .*/noise_multiplier = $SIGMA/; s/^secure_aggregation = .*/secure_aggregation = $SECAGG/; s/^round_timeout_secs = .*/round_timeout_secs = 600/" "$cfg"

echo "== 3/4 federation: coordinator + ${#SITES[@]} site-nodes on loopback mTLS ($ROUNDS rounds × $STEPS local steps, batch $BATCH, ${IMAGE}px)"
"$BIN/coordinator" run --config "$cfg" --addr-file "$OUT/coordinator.addr" \
  >"$OUT/results.txt" 2> >(tee "$OUT/logs/coordinator.log" | grep --line-buffered -E "round open|round complete|experiment complete|report written|rejected|ERROR|WARN" >&2) &
coord=$!
pids+=("$coord")
for _ in $(seq 100); do [ -s "$OUT/coordinator.addr" ] && break; sleep 0.1; done
addr=$(cat "$OUT/coordinator.addr")
for s in "${SITES[@]}"; do
  "$BIN/site-node" run --config "$OUT/pki/sites/$s/site.toml" --coordinator "https://$addr" \
    --manifest "$OUT/cohort/$s/manifest.csv" --work-dir "$OUT/sites/$s" --threads 1 \
    >/dev/null 2>"$OUT/logs/$s.log" &
  pids+=("$!")
done
wait "$coord"
for p in "${pids[@]:1}"; do wait "$p"; done
pids=()

echo "== 4/4 results (full report: $OUT/report.html and $OUT/report.json)"
cp "$OUT/pki/coordinator/state/report.json" "$OUT/report.json"
cp "$OUT/pki/coordinator/state/report.html" "$OUT/report.html"
cp "$OUT/pki/coordinator/state/features.csv" "$OUT/features.csv"
cat "$OUT/results.txt"
python3 - "$OUT" "${SITES[@]}" <<'PY'
import json, sys, statistics as st
out, sites = sys.argv[1], sys.argv[2:]
rep = json.load(open(f"{out}/report.json"))
site_t = {s: [json.loads(l) for l in open(f"{out}/sites/{s}/timings.jsonl")] for s in sites}
print("\nround timing of the main model (seconds; per site: pull / local training / push):")
for r in rep["rounds"]:
    n, e = r["round"], r["experiment"]
    if e != "main":
        continue
    parts = "  ".join(f"{s} {t['pull_s']:.1f}/{t['train_s']:.1f}/{t['push_s']:.1f}" for s in sites for t in site_t[s] if t["round"] == n and t["experiment"] == e)
    recv = max(c["receive_s"] for c in r["contributors"])
    print(f"  round {n}: wall {r['duration_s']:.1f}  aggregate {r['aggregate_s']:.2f}  checkpoint {r['checkpoint_s']:.2f}  slowest upload {recv:.2f}  | {parts}")
print(f"experiments: {', '.join(rep['experiments'])} ({len(rep['rounds'])} rounds in all)")
b = rep["rounds"][0]["contributors"][0]["bytes"]
f = rep["federation"]
print(f"bytes per update on the wire: {b} ({b/2**20:.1f} MiB); per round {f['uplink_bytes_per_round']/1e6:.1f} MB up, {f['downlink_bytes_per_round']/1e6:.1f} MB down")
PY
echo "demo wall time: $(( $(date +%s) - started )) s; everything is under $OUT/"
