#!/usr/bin/env bash
# Aggregation / compression / privacy on the synthetic cohort: runs the demo's main model
# (DEMO_STUDY=false) once per setting and tabulates the pooled task-1 test AUC and the bytes
# per round. Writes out/bench/strategies.json (and a table on stdout). About 1 min a setting.
set -euo pipefail
BIN="${BIN:?folder with the coordinator and site-node binaries}"
PY="${PY:-python3}"
ROUNDS="${DEMO_ROUNDS:-3}"
# DP at two ε: the noise multiplier for each ε over the rounds a site trains in.
sigma() { "$BIN/coordinator" privacy-budget --rounds "$ROUNDS" --epsilon "$1" | "$PY" -c 'import json,sys; print(round(json.load(sys.stdin)["noise_multiplier"], 4))'; }
SIGMA_HI=$(sigma 8)
SIGMA_LO=$(sigma 1)
CLIP="${BENCH_CLIP:-0.05}"
settings=(
  "fedavg-fp32|DEMO_CODEC=fp32"
  "fedavg-int8|DEMO_CODEC=int8-channel"
  "fedavg-dp-eps8|DEMO_DP=site DEMO_CLIP=$CLIP DEMO_SIGMA=$SIGMA_HI"
  "fedavg-dp-eps1|DEMO_DP=site DEMO_CLIP=$CLIP DEMO_SIGMA=$SIGMA_LO"
  "fedavg-secagg|DEMO_SECAGG=true"
)
for s in "${settings[@]}"; do
  name=${s%%|*}
  vars=${s#*|}
  echo "== $name ($vars)"
  env $vars DEMO_STUDY=false DEMO_ROUNDS="$ROUNDS" DEMO_OUT="out/bench/strategies/$name" BIN="$BIN" bash deploy/demo.sh >"out/bench/strategies-$name.log" 2>&1 \
    || { echo "$name failed; see out/bench/strategies-$name.log"; exit 1; }
done
"$PY" - "${settings[@]}" <<'PY'
import json, sys
rows = []
for s in sys.argv[1:]:
    name = s.split("|")[0]
    rep = json.load(open(f"out/bench/strategies/{name}/report.json"))
    methods = {m["method"]: m for m in rep["task1"]["methods"]}
    auc = lambda k: methods[k]["test"]["auc"]["auc"] if k in methods and methods[k]["test"].get("auc") else None
    f = rep["federation"]
    rows.append({"setting": name, "aggregator": f["aggregator"], "privacy": f["privacy"], "epsilon": f["epsilon"],
                 "auc_combined": auc("combined"), "auc_images": auc("images_only"), "auc_clinical": auc("clinical_only"),
                 "uplink_mb_per_round": f["uplink_bytes_per_round"] / 1e6, "downlink_mb_per_round": f["downlink_bytes_per_round"] / 1e6})
json.dump(rows, open("out/bench/strategies.json", "w"), indent=2)
print(f"\n{'setting':<16} {'ε':>7} {'AUC comb.':>9} {'AUC img':>8} {'MB up/round':>12} {'MB down/round':>14}")
for r in rows:
    eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
    f3 = lambda v: "n/a" if v is None else f"{v:.3f}"
    print(f"{r['setting']:<16} {eps:>7} {f3(r['auc_combined']):>9} {f3(r['auc_images']):>8} {r['uplink_mb_per_round']:>12.1f} {r['downlink_mb_per_round']:>14.1f}")
PY
