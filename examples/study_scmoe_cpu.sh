#!/usr/bin/env bash
# ScMoE quality at equal tokens on the shipped corpus (CPU, 2 gloo ranks, EP=2, 500 iterations; docs/scmoe.md).
# Four layers, dense/MoE alternating ([0,1,0,1]) so that Pos-2 has a dense block before each MoE
# block; every variant computes two expert FFNs per token in its MoE layers (the paper's matching).
#   bash examples/study_scmoe_cpu.sh [--dry-run]
set -euo pipefail
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
cd "$(dirname "$0")/.."
MOE_EXT=${MOE_EXT:-.venv/bin/megatron-moe-ext}
# run NAME FLAGS...: one quickstart run into runs/study/NAME (its output in runs/study/NAME.out); a failed run
# is recorded in runs/study/done.txt and the study goes on. --dry-run prints the commands instead.
run() {
  local name=$1
  shift
  local cmd=("$MOE_EXT" quickstart --output-dir "runs/study/$name" --train-iters 500 "$@")
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "${cmd[@]}" | sed 's/ $//'; echo; return 0; fi
  local rc=0
  "${cmd[@]}" > "runs/study/$name.out" 2>&1 || rc=$?
  echo "$name rc=$rc" >> runs/study/done.txt
}
# other commands of the study: printed under --dry-run, run otherwise
cmd() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; return 0; fi
  "$@"
}
if [ "$DRY_RUN" = 0 ]; then mkdir -p runs/study; fi
ALT=(--moe-layer-freq "[0,1,0,1]")
SHARED=(--moe-shared-expert-intermediate-size 256 --moe-shared-expert-gate --moe-router-pre-softmax)
run sc_top2   --topk 2 --extra "${ALT[@]}"
run sc_shared --topk 1 --extra "${ALT[@]}" "${SHARED[@]}"
run sc_pos2   --topk 1 --extra "${ALT[@]}" "${SHARED[@]}" --moe-scmoe pos2
run sc_dgmoe  --topk 1 --extra "${ALT[@]}" --moe-router-pre-softmax --moe-scmoe dgmoe
