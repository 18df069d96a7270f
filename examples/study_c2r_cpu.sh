#!/usr/bin/env bash
# C2R quality/communication study on the shipped corpus (CPU, 2 gloo ranks, EP=2; docs/c2r.md).
#   bash examples/study_c2r_cpu.sh [--dry-run]      (about 6 x 25 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=examples/study_common.sh
source examples/study_common.sh "$@"
run topk --extra --moe-ranks-per-node 1 --save-routing-trace runs/study/topk/trace
run c2r_t1 --router-policy c2r --extra --moe-c2r-top-t 1 --moe-dedup-dispatch --moe-ranks-per-node 1
run c2r_t3 --router-policy c2r --extra --moe-c2r-top-t 3 --moe-dedup-dispatch --moe-ranks-per-node 1
run c2r_t7 --router-policy c2r --extra --moe-c2r-top-t 7 --moe-dedup-dispatch --moe-ranks-per-node 1
run c2r_warm --router-policy c2r --extra --moe-c2r-top-t 3 --moe-c2r-warmup-steps 100 --moe-dedup-dispatch --moe-ranks-per-node 1
run topk_dedup --extra --moe-dedup-dispatch --moe-ranks-per-node 1
