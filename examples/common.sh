# Sourced by the example configurations (examples/*.sh): the expert backend's flags and the hand-over
# to launch/slurm_pretrain.sbatch. Not a script of its own.
#
# Variables every example reads (besides the template's, documented in launch/slurm_pretrain.sbatch):
#   EXPERT_BACKEND  te (Megatron's TEGroupedMLP; needs Transformer Engine) or torch (the plugin's
#                   torch._grouped_mm experts; no TE needed for the experts). Default: the example's.
#   FP8             1 (default): FP8 GEMMs (--fp8-format hybrid --fp8-recipe tensorwise; Hopper or newer);
#                   0: BF16. With te, the experts and every other TE linear layer run FP8; with torch, the
#                   plugin's FP8 experts (e4m3 forward and dgrad, BF16 wgrad).
#   ROUTER_PADDING  1: --moe-router-padding-for-quantization (te + FP8 only; pads in the router instead of
#                   in the experts; refused with --moe-dedup-dispatch). Default 0.
# shellcheck shell=bash

# The expert flags for EXPERT_BACKEND / FP8 / ROUTER_PADDING, into the array EXPERT_FLAGS.
expert_flags() {
  EXPERT_FLAGS=()
  case "$EXPERT_BACKEND" in
    te) EXPERT_FLAGS+=(--moe-expert-backend te --moe-grouped-gemm --transformer-impl transformer_engine) ;;
    torch) EXPERT_FLAGS+=(--moe-expert-backend torch) ;;
    *) echo "$0: error: EXPERT_BACKEND must be te or torch, got '$EXPERT_BACKEND'." >&2; exit 2 ;;
  esac
  case "$FP8" in
    1) EXPERT_FLAGS+=(--fp8-format hybrid --fp8-recipe tensorwise) ;;
    0) ;;
    *) echo "$0: error: FP8 must be 1 or 0, got '$FP8'." >&2; exit 2 ;;
  esac
  if [ "${ROUTER_PADDING:-0}" = 1 ]; then
    if [ "$EXPERT_BACKEND" != te ] || [ "$FP8" != 1 ]; then
      echo "$0: error: ROUTER_PADDING=1 applies to EXPERT_BACKEND=te with FP8=1 only." >&2; exit 2
    fi
    EXPERT_FLAGS+=(--moe-router-padding-for-quantization)
  fi
}

# run_example NNODES GPUS_PER_NODE [--dry-run] [flags...]: exec the Slurm template with MODEL_ARGS,
# PLUGIN_ARGS, ... as the example set them. Outside an allocation a --dry-run uses the example's own
# topology (NNODES nodes of GPUS_PER_NODE GPUs) unless SLURM_* say otherwise.
run_example() {
  local nnodes=$1 gpus=$2
  shift 2
  if [ "${1:-}" = "--dry-run" ] && [ -z "${SLURM_JOB_NODELIST:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
    local last
    last=$(printf '%02d' "$nnodes")
    export SLURM_JOB_NODELIST="node[01-$last]" SLURM_NNODES=${SLURM_NNODES:-$nnodes} \
      SLURM_GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-$gpus}
    echo "# no Slurm allocation: dry run on the example's topology, $SLURM_NNODES node(s) $SLURM_JOB_NODELIST x $SLURM_GPUS_PER_NODE GPU(s)"
  fi
  export MODEL_ARGS DATA_ARGS TRAIN_ARGS PLUGIN_ARGS RUN_NAME
  exec bash "$REPO_DIR/launch/slurm_pretrain.sbatch" "$@"
}
