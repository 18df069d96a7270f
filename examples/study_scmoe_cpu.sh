#!/usr/bin/env bash
# ScMoE quality at equal tokens on the shipped corpus (CPU, 2 gloo ranks, EP=2, 500 iterations; docs/scmoe.md).
# Four layers, dense/MoE alternating ([0,1,0,1]) so that Pos-2 has a dense block before each MoE
# block; every variant computes two expert FFNs per token in its MoE layers (the paper's matching).
#   bash examples/study_scmoe_cpu.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=examples/study_common.sh
source examples/study_common.sh "$@"
ALT=(--moe-layer-freq "[0,1,0,1]")
SHARED=(--moe-shared-expert-intermediate-size 256 --moe-shared-expert-gate --moe-router-pre-softmax)
run sc_top2   --topk 2 --extra "${ALT[@]}"
run sc_shared --topk 1 --extra "${ALT[@]}" "${SHARED[@]}"
run sc_pos2   --topk 1 --extra "${ALT[@]}" "${SHARED[@]}" --moe-scmoe pos2
run sc_dgmoe  --topk 1 --extra "${ALT[@]}" --moe-router-pre-softmax --moe-scmoe dgmoe
