#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time and reports executions and crashes.
#   FUZZ_SECONDS=60 bash deploy/fuzz.sh        (make fuzz)
# Needs cargo-fuzz (installed here if missing) and a nightly toolchain; without one,
# RUSTC_BOOTSTRAP=1 lets the stable compiler accept the sanitizer flags.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/alnfl/fuzz-target}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q nightly; then
  FUZZ=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  FUZZ=(cargo fuzz)
fi
status=0
for target in reassemble manifest; do
  mkdir -p "corpus/$target"
  log=$(mktemp)
  "${FUZZ[@]}" run "$target" "corpus/$target" -- -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 >"$log" 2>&1
  rc=$?
  runs=$(grep -oE "Done [0-9]+ runs" "$log" | grep -oE "[0-9]+" | tail -1)
  crashes=$(ls artifacts/"$target" 2>/dev/null | grep -c "^crash-" || true)
  echo "fuzz target $target: ${runs:-?} executions in ${SECONDS_PER_TARGET}s, exit $rc, crash files: ${crashes:-0}"
  if [ "$rc" -ne 0 ]; then tail -30 "$log"; status=1; fi
  rm -f "$log"
done
exit $status
