#!/usr/bin/env bash
# Qwen3-30B-A3B-like fine-grained MoE with C2R routing and the rank-deduplicating dispatcher, FP8 experts.
#
#   mkdir -p logs && sbatch examples/qwen3_30b_a3b_c2r.sh           # from the repository root
#   bash examples/qwen3_30b_a3b_c2r.sh --dry-run                    # print the commands (no Slurm needed)
#   EXPERT_BACKEND=te CLUSTER_CONFIG=launch/my_cluster.env sbatch examples/qwen3_30b_a3b_c2r.sh
#
# Model: Qwen3-30B-A3B's shape (48 layers, hidden 2048, 32 query / 4 KV heads of 128, QK-norm, 128 experts
# of FFN 768, top-8, vocabulary 151936) on 2 nodes x 8 GPUs: PP 2, EP 8 inside each node, DP 8.
# C2R: each token's other 7 experts come from its top-1 expert's 15 co-resident partners (the default
# T = experts per rank - 1), so with --moe-dedup-dispatch a token is sent to one rank instead of up to 8.
# From scratch the first C2R_WARMUP iterations route plain top-k while counting co-activation, then
# partners freeze (the CPU study: +0.6% loss with a 100-iteration warm-up, +5.4% without; docs/c2r.md).
# For a trained model, plan a placement first: examples/c2r_finetune_workflow.sh.
#
# Variables (and those of examples/common.sh and launch/slurm_pretrain.sbatch):
#   EXPERT_BACKEND  torch (default) or te        FP8  1 (default) or 0
#   C2R_WARMUP      top-k iterations before the partners freeze (default 200; 0: constrained from step 0)
#   DATA_ARGS       your data (default: mock data with Qwen3's vocabulary size)
#SBATCH --job-name=qwen3-c2r
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
C2R_WARMUP=${C2R_WARMUP:-200}
expert_flags
RUN_NAME=${RUN_NAME:-qwen3-30b-a3b-c2r}
MODEL_ARGS=${MODEL_ARGS:-"--num-layers 48 --hidden-size 2048 --num-attention-heads 32 --group-query-attention
  --num-query-groups 4 --kv-channels 128 --qk-layernorm --ffn-hidden-size 6144
  --seq-length 4096 --max-position-embeddings 40960 --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
  --position-embedding-type rope --rotary-base 1000000 --disable-bias-linear --untie-embeddings-and-output-weights
  --num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768
  --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3
  --moe-router-dtype fp32 --moe-permute-fusion
  --pipeline-model-parallel-size 2 --expert-model-parallel-size 8 --use-distributed-optimizer --bf16
  ${EXPERT_FLAGS[*]}"}
DATA_ARGS=${DATA_ARGS:-"--mock-data --tokenizer-type NullTokenizer --vocab-size 151936"}
TRAIN_ARGS=${TRAIN_ARGS:-"--micro-batch-size 1 --global-batch-size 512 --train-iters 20000 --lr 3e-4 --min-lr 3e-5
  --lr-decay-style cosine --lr-warmup-iters 500 --weight-decay 0.1 --clip-grad 1.0
  --log-interval 10 --eval-interval 1000 --eval-iters 10 --ckpt-format torch_dist --distributed-timeout-minutes 30"}
PLUGIN_ARGS=${PLUGIN_ARGS:-"--moe-router-policy c2r --moe-c2r-warmup-steps $C2R_WARMUP --moe-dedup-dispatch"}
run_example 2 8 "$@"
