#!/usr/bin/env bash
# GeoMFormer on the charged 5-body system (EGNN protocol; spec shared/spec/geomformer.md §A10-A11).
#
# Dataset : 3,000 / 2,000 / 2,000 simulated systems (5 particles, charges +-1, positions after 1,000
#           steps), generated here (if DATA_DIR has no train.npz) by `python scripts/make_nbody.py
#           --out DATA_DIR` (seeded; our own draws of the protocol, not EGNN's files).
# GPUs    : 1 GPU (any) or CPU=1 (geomformer_small, minutes per epoch).
# Time    : EGNN trains up to 10,000 epochs at batch 100; not measured here.
# Target  : test MSE (`fairseq-validate ... --valid-subset test` -> mse, run at the end into
#           SAVE_DIR/test.log): paper GeoMFormer 0.0047, EGNN 0.0071 (Table 6); constant-velocity
#           baseline ~0.11 on our draws.
#
# Usage   : geomformer_nbody.sh DATA_DIR SAVE_DIR [extra fairseq flags...]
# Env     : every variable below overrides its default; DRY_RUN=1 prints the resolved commands.
#           Empty size variables keep the ARCH preset's value.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=_lib.sh
source "$HERE/_lib.sh"

CPU=${CPU:-0}                           # 1: --cpu
ARCH=${ARCH:-geomformer_small}
ENCODER_LAYERS=${ENCODER_LAYERS:-}
EMBED_DIM=${EMBED_DIM:-64}
FFN_DIM=${FFN_DIM:-64}
HEADS=${HEADS:-8}
N_TRAIN=${N_TRAIN:-3000}                # systems generated per split (EGNN protocol)
N_VALID=${N_VALID:-2000}
N_TEST=${N_TEST:-2000}
BATCH_SIZE=${BATCH_SIZE:-100}
MAX_EPOCH=${MAX_EPOCH:-1000}
MAX_UPDATE=${MAX_UPDATE:-0}             # 0: no limit besides MAX_EPOCH
LR=${LR:-1e-3}
WARMUP_UPDATES=${WARMUP_UPDATES:-50}
CLIP_NORM=${CLIP_NORM:-5.0}
SEED=${SEED:-1}
NUM_WORKERS=${NUM_WORKERS:-0}
LOG_INTERVAL=${LOG_INTERVAL:-10}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}
FAIRSEQ_TRAIN=${FAIRSEQ_TRAIN:-fairseq-train}
FAIRSEQ_VALIDATE=${FAIRSEQ_VALIDATE:-fairseq-validate}

if (($# < 2)); then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
DATA_DIR=$1 SAVE_DIR=$2
shift 2

GEN=("$PYTHON" "$REPO/scripts/make_nbody.py" --out "$DATA_DIR" --train "$N_TRAIN"
    --valid "$N_VALID" --test "$N_TEST")
CMD=("$FAIRSEQ_TRAIN" --user-dir "$REPO/transformer_m"
    --task geomformer_nbody --data-path "$DATA_DIR" --criterion geomformer_nbody
    --arch "$ARCH"
    --optimizer adam --lr "$LR" --clip-norm "$CLIP_NORM"
    --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP_UPDATES" --warmup-init-lr 1e-6
    --batch-size "$BATCH_SIZE" --max-epoch "$MAX_EPOCH" --max-update "$MAX_UPDATE"
    --num-workers "$NUM_WORKERS"
    --best-checkpoint-metric mse --save-dir "$SAVE_DIR" --no-epoch-checkpoints
    --seed "$SEED" --log-format simple --log-interval "$LOG_INTERVAL")
recipe_opt CMD --encoder-layers "$ENCODER_LAYERS"
recipe_opt CMD --encoder-embed-dim "$EMBED_DIM"
recipe_opt CMD --encoder-ffn-embed-dim "$FFN_DIM"
recipe_opt CMD --encoder-attention-heads "$HEADS"
[[ "$CPU" == 1 ]] && CMD+=(--cpu)
CMD+=("$@")
VAL=("$FAIRSEQ_VALIDATE" --user-dir "$REPO/transformer_m" --task geomformer_nbody
    --data-path "$DATA_DIR" --path "$SAVE_DIR/checkpoint_best.pt" --valid-subset test
    --batch-size "$BATCH_SIZE" --num-workers "$NUM_WORKERS")
[[ "$CPU" == 1 ]] && VAL+=(--cpu)

if [[ ! -f "$DATA_DIR/train.npz" ]]; then RECIPE_PREPROCESS_CMD=("${GEN[@]}"); fi
if [[ "$DRY_RUN" == 1 ]]; then
    if ((${#RECIPE_PREPROCESS_CMD[@]})); then recipe_quote "${RECIPE_PREPROCESS_CMD[@]}"; fi
    recipe_quote "${CMD[@]}"
    recipe_quote "${VAL[@]}"
    exit 0
fi
if ((${#RECIPE_PREPROCESS_CMD[@]})); then "${RECIPE_PREPROCESS_CMD[@]}"; fi
mkdir -p "$SAVE_DIR"
recipe_save_command "$SAVE_DIR/command.sh" "${BASH_SOURCE[0]}" "${CMD[@]}"
recipe_quote "${VAL[@]}" >>"$SAVE_DIR/command.sh"
"${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"
"${VAL[@]}" 2>&1 | tee "$SAVE_DIR/test.log"
