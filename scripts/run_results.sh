#!/usr/bin/env bash
# Regenerate the committed trace-mini results on the bundled model: every method seed 0, then seeds 1-2 for the
# headline comparison (lora, seqft, moses). Runs resume, so this can be stopped and restarted at any time.
# Usage: scripts/run_results.sh [METHOD ...]   (default: all, in priority order)
set -euo pipefail
cd "$(dirname "$0")/.."
CLBENCH=${CLBENCH:-.venv/bin/clbench}
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(lora moses seqft per-task-lora olora moe-lora seta replay ewc mtl)
for m in "${methods[@]}"; do
  "$CLBENCH" run --method "$m" --benchmark trace-mini --seed 0 --no-progress
done
for seed in 1 2; do
  for m in lora seqft moses; do
    "$CLBENCH" run --method "$m" --benchmark trace-mini --seed "$seed" --no-progress
  done
done
"$CLBENCH" leaderboard results/runs --out results/leaderboard.csv
"$CLBENCH" report results/runs --out results/report
