#!/usr/bin/env bash
# C2R on a trained HuggingFace MoE: import it, profile expert co-activation, plan a placement, move the
# experts, fine-tune with C2R + the dedup dispatcher, export back to HuggingFace. One node.
#
#   HF_DIR=/models/Qwen3-30B-A3B DATA_ARGS="--data-path ... --tokenizer-type ..." bash examples/c2r_finetune_workflow.sh
#   bash examples/c2r_finetune_workflow.sh --dry-run          # print the six commands, run nothing
#   STEPS="train export-hf" bash examples/c2r_finetune_workflow.sh   # resume the workflow at a step
#
# Steps (docs/c2r.md "The workflow"), every output under WORK_DIR:
#   import-hf        HF_DIR -> base/ (a Megatron torch_dist checkpoint) and base/megatron_flags.txt (model flags)
#   profile          co-activation over PROFILE_ITERS evaluation batches of base/ -> profile/
#   plan-placement   balanced placement + TOP_T co-resident partners -> plan.json
#   apply-placement  experts (weights, router rows, expert bias) moved to their planned slots -> placed/
#   train            fine-tune from placed/ (--pretrained-checkpoint) into c2r/, which a rerun resumes
#                    (the plugin checks the placement marker of --load, i.e. c2r/ once it holds a
#                    checkpoint; the first run's placed/ comes in through --pretrained-checkpoint,
#                    unchecked, so keep plan.json and placed/ of one run together)
#   export-hf        c2r/ -> hf/ (EXPORT_DTYPE, EXPORT_ROUTING)
#
# Variables:
#   HF_DIR           the HuggingFace model folder (required unless --dry-run)
#   WORK_DIR         outputs (default runs/c2r-finetune)
#   STEPS            the steps to run, in order (default: all six)
#   NPROC            GPUs of this node for profile and train (default 8)
#   TP, PP, EP       tensor-, pipeline- and expert-parallel sizes of the imported checkpoint, of profile and
#                    of train (default 1, 1, 8; the plan is made for EP)
#   TOP_T            C2R partners per expert (default: plan-placement's, experts per rank - 1)
#   PROFILE_ITERS    evaluation batches to profile (default 50)
#   DATA_ARGS        Megatron data flags (default: mock data; the vocabulary comes from megatron_flags.txt)
#   TRAIN_ARGS       fine-tuning schedule (default: 2000 iterations at 1e-5)
#   TRAIN_LAUNCHER   local (launch/torchrun_local.sh, default) or slurm (launch/slurm_pretrain.sbatch,
#                    inside an allocation: salloc ... then STEPS=train TRAIN_LAUNCHER=slurm bash ...)
#   EXPORT_DTYPE     bf16 (default) or fp32;  EXPORT_ROUTING  native (default) or topk
#   MOE_EXT          the CLI (default: megatron-moe-ext)
set -euo pipefail
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)

WORK_DIR=${WORK_DIR:-runs/c2r-finetune}
STEPS=${STEPS:-"import-hf profile plan-placement apply-placement train export-hf"}
NPROC=${NPROC:-8}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-8}
TOP_T=${TOP_T:-}
PROFILE_ITERS=${PROFILE_ITERS:-50}
DATA_ARGS=${DATA_ARGS:-"--mock-data --tokenizer-type NullTokenizer"}
TRAIN_ARGS=${TRAIN_ARGS:-"--micro-batch-size 1 --global-batch-size 64 --train-iters 2000 --lr 1e-5 --min-lr 1e-6
  --lr-decay-style cosine --lr-warmup-iters 50 --log-interval 10 --eval-interval 500 --eval-iters 10
  --save-interval 500 --ckpt-format torch_dist"}
TRAIN_LAUNCHER=${TRAIN_LAUNCHER:-local}
EXPORT_DTYPE=${EXPORT_DTYPE:-bf16}
EXPORT_ROUTING=${EXPORT_ROUTING:-native}
MOE_EXT=${MOE_EXT:-megatron-moe-ext}
if [ "$DRY_RUN" = 0 ] && [ -z "${HF_DIR:-}" ]; then
  echo "c2r_finetune_workflow.sh: error: set HF_DIR to the HuggingFace model folder (or pass --dry-run)." >&2
  exit 2
fi
HF_DIR=${HF_DIR:-/path/to/hf-model}
BASE=$WORK_DIR/base PROFILE=$WORK_DIR/profile PLAN=$WORK_DIR/plan.json
PLACED=$WORK_DIR/placed C2R=$WORK_DIR/c2r HF_OUT=$WORK_DIR/hf
FLAGS_FILE=$BASE/megatron_flags.txt

words() { read -r -d '' -a WORDS <<< "$1" || true; }   # split a flags string on whitespace, no globbing
show() { printf '%q ' "$@" | sed 's/ $//'; echo; }
step() {  # step NAME command...: print it, and run it unless --dry-run
  echo "# step $1"
  shift
  show "$@"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}
model_flags() {  # the imported model's flags (MODEL), from import-hf's megatron_flags.txt
  if [ -f "$FLAGS_FILE" ]; then
    words "$(cat "$FLAGS_FILE")"
    MODEL=("${WORDS[@]}")
  elif [ "$DRY_RUN" = 1 ]; then
    MODEL=("<model flags from $FLAGS_FILE>")   # written by import-hf; a dry run before it shows this placeholder
  else
    echo "c2r_finetune_workflow.sh: error: $FLAGS_FILE is missing; run the import-hf step first." >&2
    exit 2
  fi
}
words "$DATA_ARGS"; DATA=("${WORDS[@]}")
words "$TRAIN_ARGS"; TRAIN=("${WORDS[@]}")
parallel=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP")
top_t=()
if [ -n "$TOP_T" ]; then top_t=(--top-t "$TOP_T"); fi

if [ "$DRY_RUN" = 0 ]; then mkdir -p "$WORK_DIR"; fi
for s in $STEPS; do
  case "$s" in
    import-hf)
      step import-hf "$MOE_EXT" import-hf --hf "$HF_DIR" --out "$BASE" "${parallel[@]}" ;;
    profile)
      model_flags
      step profile "$MOE_EXT" profile --nproc "$NPROC" --output "$PROFILE" -- "${MODEL[@]}" "${parallel[@]}" "${DATA[@]}" \
        --load "$BASE" --micro-batch-size 1 --global-batch-size "$NPROC" --train-iters 1 \
        --eval-iters "$PROFILE_ITERS" --ckpt-format torch_dist ;;
    plan-placement)
      step plan-placement "$MOE_EXT" plan-placement --profile "$PROFILE" --ep "$EP" "${top_t[@]}" \
        --co-resident-only --output "$PLAN" ;;
    apply-placement)
      step apply-placement "$MOE_EXT" apply-placement --load "$BASE" --plan "$PLAN" --save "$PLACED" ;;
    train)
      model_flags
      train=("${MODEL[@]}" "${parallel[@]}" "${DATA[@]}" "${TRAIN[@]}" --pretrained-checkpoint "$PLACED" --load "$C2R" --save "$C2R"
        --moe-router-policy c2r --moe-c2r-plan "$PLAN" --moe-dedup-dispatch --moe-ext-run-log "$WORK_DIR/train.jsonl")
      if [ "$TRAIN_LAUNCHER" = slurm ]; then
        launcher=(bash "$REPO_DIR/launch/slurm_pretrain.sbatch")
        if [ "$DRY_RUN" = 1 ]; then launcher+=(--dry-run); fi
        # the template's own defaults are replaced by this workflow's flags
        echo "# step train (through launch/slurm_pretrain.sbatch)"
        MODEL_ARGS=" " DATA_ARGS=" " TRAIN_ARGS=" " PLUGIN_ARGS=" " CKPT_DIR=$C2R OUTPUT_DIR=$WORK_DIR \
          "${launcher[@]}" "${train[@]}"
      else
        step train bash "$REPO_DIR/launch/torchrun_local.sh" --nproc "$NPROC" "${train[@]}"
      fi ;;
    export-hf)
      step export-hf "$MOE_EXT" export-hf --load "$C2R" --out "$HF_OUT" --dtype "$EXPORT_DTYPE" --routing "$EXPORT_ROUTING" ;;
    *)
      echo "c2r_finetune_workflow.sh: error: unknown step '$s' in STEPS (import-hf profile plan-placement apply-placement train export-hf)." >&2
      exit 2 ;;
  esac
done
