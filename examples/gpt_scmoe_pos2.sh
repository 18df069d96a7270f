#!/usr/bin/env bash
# GPT-style MoE with shortcut-connected expert layers (ScMoE pos2): dense/MoE alternation, a gated shared
# expert plus top-1 routed experts whose all-to-all runs beside the dense block's compute; FP8 experts.
#
#   mkdir -p logs && sbatch examples/gpt_scmoe_pos2.sh              # from the repository root
#   bash examples/gpt_scmoe_pos2.sh --dry-run                       # print the commands (no Slurm needed)
#
# Model: GPT-2/3 style (LayerNorm, GELU, learned positions, tied embeddings; no biases, which the torch
# expert backend requires), 24 layers [dense, MoE] x 12, hidden 2048, 16 heads, 32 experts of FFN 2048 + a gated shared
# expert of FFN 2048, top-1 with full-softmax probabilities (ScMoE requires --moe-router-pre-softmax at
# top-1), on 2 nodes x 8 GPUs with EP 16. The expert slot is chosen by timing the first steps (auto).
# Rules (refused at start with one sentence, docs/troubleshooting.md): pos2 needs a dense block before
# each MoE block, so no MoE layer may follow another; with pipeline parallelism a stage boundary may
# not fall between a dense layer and the MoE layer reading it (split the 24 layers in pairs).
#
# Variables (and those of examples/common.sh and launch/slurm_pretrain.sbatch):
#   EXPERT_BACKEND  torch (default) or te        FP8  1 (default) or 0
#SBATCH --job-name=gpt-scmoe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
set -euo pipefail
if [ -f "$(dirname "$0")/common.sh" ]; then REPO_DIR=$(cd "$(dirname "$0")/.." && pwd); else REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}; fi
# shellcheck source=examples/common.sh
source "$REPO_DIR/examples/common.sh"

EXPERT_BACKEND=${EXPERT_BACKEND:-torch}
FP8=${FP8:-1}
expert_flags
RUN_NAME=${RUN_NAME:-gpt-scmoe-pos2}
MODEL_ARGS=${MODEL_ARGS:-"--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 8192
  --seq-length 2048 --max-position-embeddings 2048 --normalization LayerNorm
  --position-embedding-type learned_absolute --disable-bias-linear
  --num-experts 32 --moe-router-topk 1 --moe-ffn-hidden-size 2048 --moe-layer-freq ([0,1]*12)
  --moe-shared-expert-intermediate-size 2048 --moe-shared-expert-gate --moe-router-pre-softmax
  --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
  --moe-router-dtype fp32 --expert-model-parallel-size 16 --use-distributed-optimizer --bf16
  ${EXPERT_FLAGS[*]}"}
DATA_ARGS=${DATA_ARGS:-"--mock-data --tokenizer-type NullTokenizer --vocab-size 50304"}
TRAIN_ARGS=${TRAIN_ARGS:-"--micro-batch-size 4 --global-batch-size 512 --train-iters 20000 --lr 3e-4 --min-lr 3e-5
  --lr-decay-style cosine --lr-warmup-iters 500 --weight-decay 0.1 --clip-grad 1.0
  --log-interval 10 --eval-interval 1000 --eval-iters 10 --ckpt-format torch_dist --distributed-timeout-minutes 30"}
PLUGIN_ARGS=${PLUGIN_ARGS:-"--moe-router-policy topk --moe-scmoe pos2 --moe-scmoe-expert-slot auto"}
run_example 2 8 "$@"
