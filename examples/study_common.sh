# Shared by examples/study_*_cpu.sh (sourced after `cd` to the repository root, with the script's
# arguments): --dry-run, and the run/cmd helpers every study uses.
# shellcheck shell=bash
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
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
