#!/usr/bin/env bash
# GeoMFormer on the charged 5-body system (EGNN protocol; spec shared/spec/geomformer.md §A10-A11).
#
# Dataset : 3,000 / 2,000 / 2,000 simulated systems (5 particles, charges +-1, positions after 1,000
#           steps), generated here (if missing) by `python scripts/make_nbody.py --out DATA_DIR`
#           (seeded; our own draws of the protocol, not EGNN's files).
# GPUs    : 1 GPU (any) or CPU=1 (ARCH=geomformer_small, minutes per epoch).
# Time    : EGNN trains up to 10,000 epochs at batch 100; not measured here.
# Target  : test MSE (`fairseq-validate ... --valid-subset test` -> mse): paper GeoMFormer 0.0047,
#           EGNN 0.0071 (Table 6); constant-velocity baseline ~0.11 on our draws.
#
# Usage   : geomformer_nbody.sh DATA_DIR SAVE_DIR [extra fairseq flags...]
# Env     : every variable below overrides its default; DRY_RUN=1 prints the resolved commands.
set -euo pipefail

ARCH=${ARCH:-geomformer_small}
EMBED_DIM=${EMBED_DIM:-64}
FFN_DIM=${FFN_DIM:-64}
HEADS=${HEADS:-8}
BATCH_SIZE=${BATCH_SIZE:-100}
MAX_EPOCH=${MAX_EPOCH:-1000}
LR=${LR:-1e-3}
WARMUP_UPDATES=${WARMUP_UPDATES:-50}
CLIP_NORM=${CLIP_NORM:-5.0}
SEED=${SEED:-1}
CPU=${CPU:-0}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}

[[ $# -ge 2 ]] || { sed -n '2,13p' "$0"; exit 2; }
DATA_DIR=$1; SAVE_DIR=$2; shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
source "$HERE/_lib.sh"

GEN=("$PYTHON" "$REPO/scripts/make_nbody.py" --out "$DATA_DIR")
CMD=(fairseq-train --user-dir "$REPO/transformer_m"
    --task geomformer_nbody --data-path "$DATA_DIR" --criterion geomformer_nbody
    --arch "$ARCH" --encoder-embed-dim "$EMBED_DIM" --encoder-ffn-embed-dim "$FFN_DIM"
    --encoder-attention-heads "$HEADS"
    --optimizer adam --lr "$LR" --clip-norm "$CLIP_NORM"
    --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP_UPDATES" --warmup-init-lr 1e-6
    --batch-size "$BATCH_SIZE" --max-epoch "$MAX_EPOCH" --num-workers 0
    --best-checkpoint-metric mse --save-dir "$SAVE_DIR" --no-epoch-checkpoints
    --seed "$SEED" --log-format simple --log-interval 10)
[[ "$CPU" == 1 ]] && CMD+=(--cpu)
CMD+=("$@")
VAL=(fairseq-validate --user-dir "$REPO/transformer_m" --task geomformer_nbody --data-path "$DATA_DIR"
    --path "$SAVE_DIR/checkpoint_best.pt" --valid-subset test --batch-size "$BATCH_SIZE" --num-workers 0)
[[ "$CPU" == 1 ]] && VAL+=(--cpu)

if [[ "$DRY_RUN" == 1 ]]; then
    [[ -f "$DATA_DIR/train.npz" ]] || recipe_quote "${GEN[@]}"
    recipe_quote "${CMD[@]}"; recipe_quote "${VAL[@]}"; exit 0
fi
[[ -f "$DATA_DIR/train.npz" ]] || "${GEN[@]}"
mkdir -p "$SAVE_DIR"
recipe_save_command "$SAVE_DIR/command.sh" "$0" "${CMD[@]}"
recipe_quote "${VAL[@]}" >>"$SAVE_DIR/command.sh"
"${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"
"${VAL[@]}" 2>&1 | tee "$SAVE_DIR/test.log"
