#!/usr/bin/env bash
# GeoMFormer on MD17 / rMD17 energies + forces (spec shared/spec/geomformer.md §A7, §A11).
#
# Dataset : one MD17 or rMD17 molecule (npz; units from its r_unit/e_unit fields, or Å and
#           kcal/mol, stored as Å, kcal/mol, kcal/mol/Å), written here (if LMDB_DIR has no
#           train.lmdb) by `graphormer-ext-preprocess md17 --path NPZ --train N_TRAIN
#           --valid N_VALID [--test N_TEST] --out LMDB_DIR`.
#           Protocols: MD17 draws 950 train / 50 valid frames from the full trajectory and tests
#           on all the rest (N_TRAIN=950 N_VALID=50, N_TEST empty); rMD17's README advises at
#           most 1,000 training frames. The preprocessor refuses a test split smaller than the
#           valid split. The paper's MD17 set-up (molecules, split, hyper-parameters) is UNKNOWN
#           (§A10): MD17 is used only for an ablation there, so there is no published number.
# GPUs    : 1 GPU (any). CPU=1: a CPU demo (geomformer_small, batch 8, warmup 100, 20 epochs).
# Time    : 1000 epochs of 950 frames at batch 8 ~ 120k updates; several hours on one GPU (not
#           measured).
# Target  : test force MAE (kcal/mol/Å) from `fairseq-validate ... --valid-subset test`
#           (force_mae), run at the end into SAVE_DIR/test.log.
#
# Usage   : geomformer_md17.sh NPZ LMDB_DIR SAVE_DIR [extra fairseq flags...]
# Env     : every variable below overrides its default; DRY_RUN=1 prints the resolved commands.
#           Empty size variables keep the ARCH preset's value.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=_lib.sh
source "$HERE/_lib.sh"

CPU=${CPU:-0}                           # 1: --cpu and the CPU demo defaults (second values)
ARCH=${ARCH:-$(recipe_if_cpu geomformer_small geomformer_base)}
ENCODER_LAYERS=${ENCODER_LAYERS:-}
EMBED_DIM=${EMBED_DIM:-}
FFN_DIM=${FFN_DIM:-}
HEADS=${HEADS:-}
FORCE_MODE=${FORCE_MODE:-grad}          # grad: F = -dE/dR; direct: equivariant head
LOSS_TYPE=${LOSS_TYPE:-l1}
ENERGY_WEIGHT=${ENERGY_WEIGHT:-0.2}
FORCE_WEIGHT=${FORCE_WEIGHT:-0.8}
N_TRAIN=${N_TRAIN:-950}
N_VALID=${N_VALID:-50}
N_TEST=${N_TEST:-}                      # empty: all remaining frames (the MD17 protocol)
SPLIT_SEED=${SPLIT_SEED:-0}
BATCH_SIZE=${BATCH_SIZE:-8}
MAX_EPOCH=${MAX_EPOCH:-$(recipe_if_cpu 20 1000)}
MAX_UPDATE=${MAX_UPDATE:-0}             # 0: no limit besides MAX_EPOCH
LR=${LR:-5e-4}
WARMUP_UPDATES=${WARMUP_UPDATES:-$(recipe_if_cpu 100 1000)}
CLIP_NORM=${CLIP_NORM:-10.0}
SEED=${SEED:-1}
NUM_WORKERS=${NUM_WORKERS:-0}
LOG_INTERVAL=${LOG_INTERVAL:-50}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}
PREPROCESS_BIN=${PREPROCESS_BIN:-graphormer-ext-preprocess}
FAIRSEQ_TRAIN=${FAIRSEQ_TRAIN:-fairseq-train}
FAIRSEQ_VALIDATE=${FAIRSEQ_VALIDATE:-fairseq-validate}

if (($# < 3)); then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
NPZ=$1 LMDB_DIR=$2 SAVE_DIR=$3
shift 3

PRE=("$PREPROCESS_BIN" md17 --path "$NPZ" --train "$N_TRAIN" --valid "$N_VALID"
    --seed "$SPLIT_SEED" --out "$LMDB_DIR" --workers 1 --no-progress)
recipe_opt PRE --test "$N_TEST"
CMD=("$FAIRSEQ_TRAIN" --user-dir "$REPO/transformer_m"
    --task geomformer_md17 --data-path "$LMDB_DIR"
    --arch "$ARCH" --force-mode "$FORCE_MODE"
    --criterion geomformer_md17 --loss-type "$LOSS_TYPE"
    --energy-weight "$ENERGY_WEIGHT" --force-weight "$FORCE_WEIGHT"
    --optimizer adam --adam-betas "(0.9, 0.999)" --lr "$LR" --clip-norm "$CLIP_NORM"
    --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP_UPDATES" --warmup-init-lr 1e-7
    --batch-size "$BATCH_SIZE" --max-epoch "$MAX_EPOCH" --max-update "$MAX_UPDATE"
    --num-workers "$NUM_WORKERS"
    --best-checkpoint-metric force_mae --save-dir "$SAVE_DIR" --no-epoch-checkpoints
    --seed "$SEED" --log-format simple --log-interval "$LOG_INTERVAL")
recipe_opt CMD --encoder-layers "$ENCODER_LAYERS"
recipe_opt CMD --encoder-embed-dim "$EMBED_DIM"
recipe_opt CMD --encoder-ffn-embed-dim "$FFN_DIM"
recipe_opt CMD --encoder-attention-heads "$HEADS"
[[ "$CPU" == 1 ]] && CMD+=(--cpu)
CMD+=("$@")
VAL=("$FAIRSEQ_VALIDATE" --user-dir "$REPO/transformer_m" --task geomformer_md17
    --data-path "$LMDB_DIR" --path "$SAVE_DIR/checkpoint_best.pt" --valid-subset test
    --batch-size "$BATCH_SIZE" --num-workers "$NUM_WORKERS")
[[ "$CPU" == 1 ]] && VAL+=(--cpu)

if [[ ! -f "$LMDB_DIR/train.lmdb" ]]; then RECIPE_PREPROCESS_CMD=("${PRE[@]}"); fi
if [[ "$DRY_RUN" == 1 ]]; then
    if ((${#RECIPE_PREPROCESS_CMD[@]})); then recipe_quote "${RECIPE_PREPROCESS_CMD[@]}"; fi
    recipe_quote "${CMD[@]}"
    recipe_quote "${VAL[@]}"
    exit 0
fi
if ((${#RECIPE_PREPROCESS_CMD[@]})); then
    [[ -f "$NPZ" ]] || recipe_die "MD17 file $NPZ does not exist"
    "${RECIPE_PREPROCESS_CMD[@]}"
fi
mkdir -p "$SAVE_DIR"
recipe_save_command "$SAVE_DIR/command.sh" "${BASH_SOURCE[0]}" "${CMD[@]}"
recipe_quote "${VAL[@]}" >>"$SAVE_DIR/command.sh"
"${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"
"${VAL[@]}" 2>&1 | tee "$SAVE_DIR/test.log"
