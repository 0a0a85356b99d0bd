#!/usr/bin/env bash
# 3D-GSRD pre-training (NeurIPS 2025; spec shared/spec/gsrd.md §B8-B9): masked 3D graph
# auto-encoder with selective re-mask decoding on the PCQM4Mv2 3D train molecules.
#
# Dataset : PCQM4Mv2 train with DFT 3D (3,378,606 molecules); the last VALID_FROM_TRAIN (100) are
#           held out for validation (the published split Others/100/100). LMDB_DIR is written by
#           `graphormer-ext-preprocess pcqm4mv2 --root ROOT --out LMDB_DIR` (train needs the SDF).
# GPUs    : published: 1 GPU, batch 128 x accumulation 2 (effective 256), fp32 (TF32 matmul).
#           Here: N_GPU x BATCH_SIZE x UPDATE_FREQ = 256 by default (1 x 128 x 2).
# Time    : 30 epochs ~= 396k updates; order of days on one A100/H100 (not measured here).
# Target  : the pre-training objective only (valid mask_mse = masked-coordinate MSE in Å^2, the
#           published "test_MAE"); the real target is the downstream MD17/QM9 error.
#
# Usage   : gsrd_pretrain.sh LMDB_DIR SAVE_DIR [extra fairseq flags...]
# Env     : every variable below overrides its default; DRY_RUN=1 prints the resolved command;
#           CPU=1 runs on CPU (demo sizes: ARCH=gsrd_small).
set -euo pipefail

# --- hyperparameters (published run_pretrain.sh / defaults, §B9) --------------------------------
ARCH=${ARCH:-gsrd_base}                 # 8 x d256 H8 encoder, 8 x d64 2D encoder, 2 decoder blocks
N_GPU=${N_GPU:-1}
BATCH_SIZE=${BATCH_SIZE:-128}
UPDATE_FREQ=${UPDATE_FREQ:-2}
MAX_EPOCH=${MAX_EPOCH:-30}
MAX_UPDATE=${MAX_UPDATE:-0}             # 0: from epochs (published max_steps 4M is not binding)
LR=${LR:-5e-5}
MIN_LR=${MIN_LR:-1e-6}
WARMUP_UPDATES=${WARMUP_UPDATES:-1000}  # code default; the paper appendix reportedly says 10,000
WEIGHT_DECAY=${WEIGHT_DECAY:-1e-16}     # AdamW (fairseq adam = decoupled weight decay)
MASK_RATIO=${MASK_RATIO:-0.25}
NOISE_SCALE=${NOISE_SCALE:-0.04}
DENOISING_WEIGHT=${DENOISING_WEIGHT:-0.1}
DISTILL_WEIGHT=${DISTILL_WEIGHT:-1.0}
VEC_REG_WEIGHT=${VEC_REG_WEIGHT:-0.01}
VALID_FROM_TRAIN=${VALID_FROM_TRAIN:-100}
TRAIN_LIMIT=${TRAIN_LIMIT:-0}
PHYSICAL=${PHYSICAL:-0}                 # 1: physically correct encoder (no published quirks)
SAVE_INTERVAL=${SAVE_INTERVAL:-5}       # epochs (published: every 5)
SEED=${SEED:-1}
NUM_WORKERS=${NUM_WORKERS:-8}
CPU=${CPU:-0}
DRY_RUN=${DRY_RUN:-0}

[[ $# -ge 2 ]] || { sed -n '2,16p' "$0"; exit 2; }
LMDB_DIR=$1; SAVE_DIR=$2; shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
FAIRSEQ_TRAIN=${FAIRSEQ_TRAIN:-fairseq-train}
source "$HERE/_lib.sh"
RECIPE_PREPROCESS_CMD=()

# total updates for the cosine schedule (published: per-epoch cosine over MAX_EPOCH epochs)
if [[ "$MAX_UPDATE" == 0 && -f "$LMDB_DIR/train.lmdb" ]]; then
    N_TRAIN=$(python -c 'import sys
from graphormer_ext.data.lmdb_dataset import LMDBDataset
n = len(LMDBDataset(sys.argv[1] + "/train.lmdb")); lim = int(sys.argv[2]); n = min(n, lim) if lim > 0 else n
print(max(n - int(sys.argv[3]), 1))' "$LMDB_DIR" "$TRAIN_LIMIT" "$VALID_FROM_TRAIN" 2>/dev/null || echo 3378406)
    EFF=$((N_GPU * BATCH_SIZE * UPDATE_FREQ))
    MAX_UPDATE=$(( (N_TRAIN + EFF - 1) / EFF * MAX_EPOCH ))
elif [[ "$MAX_UPDATE" == 0 ]]; then  # no LMDB yet (dry run): published dataset size
    MAX_UPDATE=$(( (3378406 + N_GPU * BATCH_SIZE * UPDATE_FREQ - 1) / (N_GPU * BATCH_SIZE * UPDATE_FREQ) * MAX_EPOCH ))
fi

CMD=("$FAIRSEQ_TRAIN" --user-dir "$REPO/transformer_m"
    --task gsrd_pretrain --data-path "$LMDB_DIR" --mask-ratio "$MASK_RATIO" --noise-scale "$NOISE_SCALE"
    --valid-from-train "$VALID_FROM_TRAIN" --train-limit "$TRAIN_LIMIT"
    --arch "$ARCH" --criterion gsrd_pretrain --denoising-weight "$DENOISING_WEIGHT"
    --distill-weight "$DISTILL_WEIGHT" --vec-reg-weight "$VEC_REG_WEIGHT"
    --optimizer adam --adam-betas "(0.9, 0.999)" --adam-eps 1e-8 --weight-decay "$WEIGHT_DECAY"
    --lr "$LR" --lr-scheduler cosine --warmup-updates "$WARMUP_UPDATES" --warmup-init-lr 0
    --min-lr "$MIN_LR" --max-update "$MAX_UPDATE" --max-epoch "$MAX_EPOCH"
    --batch-size "$BATCH_SIZE" --update-freq "$UPDATE_FREQ" --num-workers "$NUM_WORKERS"
    --save-dir "$SAVE_DIR" --save-interval "$SAVE_INTERVAL" --keep-last-epochs 2
    --seed "$SEED" --log-format simple --log-interval 50)
[[ "$PHYSICAL" == 1 ]] && CMD+=(--physical)
if [[ "$CPU" == 1 ]]; then CMD+=(--cpu); else CMD+=(--distributed-world-size "$N_GPU"); fi
CMD+=("$@")

if [[ "$DRY_RUN" == 1 ]]; then recipe_quote "${CMD[@]}"; exit 0; fi
mkdir -p "$SAVE_DIR"
recipe_save_command "$SAVE_DIR/command.sh" "$0" "${CMD[@]}"
"${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"
