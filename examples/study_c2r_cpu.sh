#!/usr/bin/env bash
# C2R quality/communication study on the shipped corpus (CPU, 2 gloo ranks, EP=2; docs/c2r.md).
#   bash examples/study_c2r_cpu.sh [--dry-run]      (about 6 x 25 minutes on 2 cores)
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
run topk --extra --moe-ranks-per-node 1 --save-routing-trace runs/study/topk/trace
run c2r_t1 --router-policy c2r --extra --moe-c2r-top-t 1 --moe-dedup-dispatch --moe-ranks-per-node 1
run c2r_t3 --router-policy c2r --extra --moe-c2r-top-t 3 --moe-dedup-dispatch --moe-ranks-per-node 1
run c2r_t7 --router-policy c2r --extra --moe-c2r-top-t 7 --moe-dedup-dispatch --moe-ranks-per-node 1
run c2r_warm --router-policy c2r --extra --moe-c2r-top-t 3 --moe-c2r-warmup-steps 100 --moe-dedup-dispatch --moe-ranks-per-node 1
run topk_dedup --extra --moe-dedup-dispatch --moe-ranks-per-node 1
