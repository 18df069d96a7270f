#!/usr/bin/env bash
# The results study (benchmarks/quality_study.py) on the lent one-GPU machine. Nothing can be
# downloaded there, so what it lacks travels with the working tree (the run tool's `carry`):
#   data/study/prepared   the prepared corpus (docs/results-corpus.md; 41 MiB)
#   .whl                  megatron-core, sentencepiece (and pytest) wheels, made on this side once:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2 sentencepiece==0.2.3
# There, from the repository root:
#   bash benchmarks/run_quality_study.sh --rows topk,c2r-warmup-t1 --seeds 1234 [more quality_study flags]
# Results accumulate in runs/quality_study (git-ignored, kept on a warm machine between calls;
# --skip-done skips finished rows); what is copied to $OUT is said below.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/wheel_env.sh
source benchmarks/wheel_env.sh
use_wheels megatron.core sentencepiece
out=runs/quality_study
# what comes back (at most 8 files from $OUT): results.tar.gz (one JSON per run),
# refreshed every 20 s so the runs finished before a cut-off still come back; the log; and at the
# end summary.json/.md and runs.tar.gz (logs, run.jsonl, comm-volume JSON and plans of every run; no checkpoints, no traces)
save_results() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT/quality_study"
  tar czf "$OUT/quality_study/results.tmp.tgz" -C "$out" results 2>/dev/null && mv "$OUT/quality_study/results.tmp.tgz" "$OUT/quality_study/results.tar.gz"
  cp runs/quality_study.log "$OUT/quality_study/" 2>/dev/null || true
}
mkdir -p "$out/results"
( while sleep 20; do save_results; done ) &
saver=$!
set +e
python3 benchmarks/quality_study.py --data data/study/prepared --out "$out" --skip-done "$@" 2>&1 | tee -a runs/quality_study.log
rc=${PIPESTATUS[0]}
set -e
kill "$saver" 2>/dev/null || true
save_results
if [ -n "${OUT:-}" ]; then
  cp "$out/summary.json" "$out/summary.md" "$OUT/quality_study/" 2>/dev/null || true
  tar czf "$OUT/quality_study/runs.tar.gz" --exclude='ckpt*' --exclude='trace' -C "$out" runs 2>/dev/null || true
fi
exit "$rc"
