#!/usr/bin/env bash
# Mixtral-like coarse-grained MoE with LocMoE routing across nodes, FP8 experts.
#
#   mkdir -p logs && sbatch examples/mixtral_locmoe.sh              # from the repository root
#   bash examples/mixtral_locmoe.sh --dry-run                       # print the commands (no Slurm needed)
#   EXPERT_BACKEND=torch sbatch examples/mixtral_locmoe.sh
#
# Model: Mixtral-8x7B's layer shape (hidden 4096, 32 query / 8 KV heads, 8 experts of FFN 14336, top-2,
# rope base 1e6), 16 layers so that it fits without pipeline parallelism, on 2 nodes x 4 GPUs with EP 8:
# the expert-parallel group spans both nodes, which is where a locality-aware router has something to
# save (with EP inside one node every expert is local). On 8-GPU nodes use 4 GPUs of each node
# (#SBATCH --gpus-per-node=4) or double the experts (MODEL_ARGS) and EP to 16.
# Memory: one expert of 14336 per GPU, its optimizer state unsharded (expert DP 1): fits 141-186 GB GPUs
# (H200, GB200); on 80 GB GPUs add --recompute-granularity full --recompute-method uniform (TRAIN_ARGS).
# LocMoE: node-local experts get a selection bias LOCAL_BIAS after LOCAL_BIAS_WARMUP unbiased iterations
# (the CPU study: B 0.6 after 100 iterations: inter-node rows -58% at +0.1% validation loss; docs/locmoe.md).
#
# Variables (and those of examples/common.sh and launch/slurm_pretrain.sbatch):
#   EXPERT_BACKEND  te (default) or torch        FP8  1 (default) or 0
#   ROUTER_PADDING  1 (default with te + FP8): pad in the router (the fastest TE FP8 row in docs/performance.md)
#   LOCAL_BIAS, LOCAL_BIAS_WARMUP   defaults 0.6 and 100
#SBATCH --job-name=mixtral-locmoe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
set -euo pipefail
if [ -f "$(dirname "$0")/common.sh" ]; then REPO_DIR=$(cd "$(dirname "$0")/.." && pwd); else REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}; fi
# shellcheck source=examples/common.sh
source "$REPO_DIR/examples/common.sh"

EXPERT_BACKEND=${EXPERT_BACKEND:-te}
FP8=${FP8:-1}
if [ "$EXPERT_BACKEND" = te ] && [ "$FP8" = 1 ]; then ROUTER_PADDING=${ROUTER_PADDING:-1}; fi
LOCAL_BIAS=${LOCAL_BIAS:-0.6}
LOCAL_BIAS_WARMUP=${LOCAL_BIAS_WARMUP:-100}
expert_flags
RUN_NAME=${RUN_NAME:-mixtral-locmoe}
MODEL_ARGS=${MODEL_ARGS:-"--num-layers 16 --hidden-size 4096 --num-attention-heads 32 --group-query-attention
  --num-query-groups 8 --ffn-hidden-size 14336 --seq-length 4096 --max-position-embeddings 32768
  --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --position-embedding-type rope --rotary-base 1000000
  --disable-bias-linear --untie-embeddings-and-output-weights
  --num-experts 8 --moe-router-topk 2 --moe-token-dispatcher-type alltoall
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 --moe-router-dtype fp32 --moe-permute-fusion
  --expert-model-parallel-size 8 --use-distributed-optimizer --bf16
  ${EXPERT_FLAGS[*]}"}
DATA_ARGS=${DATA_ARGS:-"--mock-data --tokenizer-type NullTokenizer --vocab-size 32000"}
TRAIN_ARGS=${TRAIN_ARGS:-"--micro-batch-size 1 --global-batch-size 256 --train-iters 20000 --lr 1e-4 --min-lr 1e-5
  --lr-decay-style cosine --lr-warmup-iters 500 --weight-decay 0.1 --clip-grad 1.0
  --log-interval 10 --eval-interval 1000 --eval-iters 10 --ckpt-format torch_dist --distributed-timeout-minutes 30"}
PLUGIN_ARGS=${PLUGIN_ARGS:-"--moe-router-policy locmoe --moe-locmoe-local-bias $LOCAL_BIAS
  --moe-locmoe-local-bias-warmup-steps $LOCAL_BIAS_WARMUP"}
run_example 2 4 "$@"
