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
# --skip-done skips finished rows), and results/, summary.json and summary.md are copied to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/site
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import megatron.core, sentencepiece" 2>/dev/null; then
  compgen -G ".whl/*.whl" >/dev/null || {
    echo "megatron-core or sentencepiece is missing and there is no .whl/ folder: see the top of $0" >&2
    exit 2
  }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
out=runs/quality_study
set +e
python3 benchmarks/quality_study.py --data data/study/prepared --out "$out" --skip-done "$@" 2>&1 | tee -a /tmp/quality_study.log
rc=${PIPESTATUS[0]}
set -e
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/quality_study"
  cp -r "$out/results" "$out/summary.json" "$out/summary.md" "$OUT/quality_study/" 2>/dev/null || true
  cp /tmp/quality_study.log "$OUT/quality_study/" || true
  # logs and routing traces of every run, without checkpoints
  tar czf "$OUT/quality_study/runs.tar.gz" --exclude='ckpt*' --exclude='ckpt_placed' -C "$out" runs 2>/dev/null || true
fi
exit "$rc"
