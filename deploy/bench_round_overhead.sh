#!/usr/bin/env bash
# Round overhead alone: coordinator + 3 site-nodes on loopback mTLS with the full bimodal
# ResNet50 (24.6 M values), sites in --overhead-probe mode (no training: they pull the model,
# return the weights unchanged as a zero delta, keep their local copy and push it). Every
# second of a round is then federation plumbing: pull, serialise, transfer, validate,
# aggregate, checkpoint. Writes out/bench/round_overhead.json (and a table on stdout).
set -euo pipefail
BIN="${BIN:?folder with the coordinator and site-node binaries}"
PY="${PY:-python3}"
ROUNDS="${BENCH_ROUNDS:-5}"
OUT="${BENCH_OUT:-out/bench/round_overhead}"
SITES=(site-a site-b site-c)
rm -rf "$OUT"
mkdir -p "$OUT/logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
"$BIN/site-node" synth --sites 3 --patients 60 --seed 3 --out "$OUT/cohort" 2>"$OUT/logs/synth.log"
"$BIN/coordinator" provision --sites "$(IFS=,; echo "${SITES[*]}")" --out "$OUT/pki" 2>"$OUT/logs/provision.log"
"$BIN/site-node" init-model --out "$OUT/pki/coordinator/initial_model.safetensors" 2>"$OUT/logs/init-model.log"
cfg="$OUT/pki/coordinator/coordinator.toml"
sed -i "s/^listen = .*/listen = \"127.0.0.1:0\"/; s/^rounds = .*/rounds = $ROUNDS/; s/^local_steps = .*/local_steps = 1/; s/^image_size = .*/image_size = 32/" "$cfg"
"$BIN/coordinator" run --config "$cfg" --addr-file "$OUT/addr" >/dev/null 2>"$OUT/logs/coordinator.log" &
coord=$!
pids+=("$coord")
for _ in $(seq 100); do [ -s "$OUT/addr" ] && break; sleep 0.1; done
for s in "${SITES[@]}"; do
  "$BIN/site-node" run --overhead-probe --config "$OUT/pki/sites/$s/site.toml" --coordinator "https://$(cat "$OUT/addr")" \
    --manifest "$OUT/cohort/$s/manifest.csv" --work-dir "$OUT/sites/$s" --threads 1 >/dev/null 2>"$OUT/logs/$s.log" &
  pids+=("$!")
done
wait "$coord"
for p in "${pids[@]:1}"; do wait "$p"; done
pids=()
"$PY" - "$OUT" "${SITES[@]}" <<'PY'
import json, sys, statistics as st
out, sites = sys.argv[1], sys.argv[2:]
state = json.load(open(f"{out}/pki/coordinator/state/round_state.json"))
timings = {s: {t["round"]: t for t in map(json.loads, open(f"{out}/sites/{s}/timings.jsonl")) if t["experiment"] == "main"} for s in sites}
rows = []
for r in state["history"]:
    if r["experiment"] != "main":
        continue
    n = r["round"]
    t = [timings[s][n] for s in sites]
    c = r["contributors"]
    rows.append({
        "round": n,
        # The next round opens right after aggregation; the checkpoint is written meanwhile.
        "round_wall_s": r["duration_s"] + r["aggregate_s"],
        "open_to_last_update_s": r["duration_s"],
        "pull_s": max(x["pull_s"] for x in t),
        "prepare_s": max(x["prepare_s"] for x in t),
        "push_s": max(x["push_s"] for x in t),
        "receive_decode_spool_s": max(x["receive_s"] for x in c),
        "validate_accumulate_s": max(x.get("accumulate_s", 0.0) for x in c),
        "aggregate_s": r["aggregate_s"],
        "checkpoint_background_s": r["checkpoint_s"],
        "uplink_bytes": r["uplink_bytes"],
        "downlink_bytes": r["downlink_bytes"],
    })
# Round 1 includes the sites' start-up (joining, loading crops); report the steady state.
steady = rows[1:] or rows
med = {k: st.median(r[k] for r in steady) for k in steady[0] if k != "round"}
json.dump({"rounds": rows, "median_steady_state": med, "sites": len(sites), "model_values": state["history"][0]["uplink_bytes"] // 4 // len(sites)}, open(f"{out}/../round_overhead.json", "w"), indent=2)
print(f"\nround overhead with zero-training sites (3 sites, full bimodal ResNet50, loopback mTLS), median of rounds 2..{len(rows)}:")
for k, v in med.items():
    unit = "MB" if k.endswith("bytes") else "s"
    print(f"  {k:<26} {v/1e6 if unit == 'MB' else v:>9.3f} {unit}")
PY
