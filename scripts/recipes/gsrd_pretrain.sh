#!/usr/bin/env bash
# 3D-GSRD pre-training (NeurIPS 2025; spec shared/spec/gsrd.md §B8-B9): masked 3D graph
# auto-encoder with selective re-mask decoding on the PCQM4Mv2 3D train molecules.
#
# Dataset : PCQM4Mv2 train with DFT 3D (3,378,606 molecules); the last VALID_FROM_TRAIN (100) are
#           held out for validation (the published split Others/100/100). LMDB_DIR is written by
#           `graphormer-ext-preprocess pcqm4mv2 --root ROOT --out LMDB_DIR` (train needs the SDF).
# GPUs    : published: 1 GPU, batch 128 x accumulation 2 (effective 256), fp32 (TF32 matmul).
#           Here: N_GPU x BATCH_SIZE x UPDATE_FREQ = 256 by default (1 x 128 x 2). CPU=1: a CPU
#           demo (gsrd_small, batch 16 x 1, no workers, warmup 100, 2 epochs).
# Time    : 30 epochs ~= 396k updates; order of days on one A100/H100 (not measured here).
# Target  : the pre-training objective only (valid mask_mse = masked-coordinate MSE in Å^2, the
#           published "test_MAE"); the real target is the downstream MD17/QM9 error.
#
# Usage   : gsrd_pretrain.sh LMDB_DIR SAVE_DIR [extra fairseq flags...]
# Env     : every variable below overrides its default; DRY_RUN=1 prints the resolved command;
#           CPU=1 runs on CPU with the demo defaults (the second values below). Empty size
#           variables keep the ARCH preset's value.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=_lib.sh
source "$HERE/_lib.sh"

# --- hyperparameters (published run_pretrain.sh / defaults, §B9) --------------------------------
CPU=${CPU:-0}
ARCH=${ARCH:-$(recipe_if_cpu gsrd_small gsrd_base)}  # base: 8 x d256 H8 encoder, 8 x d64 2D encoder, 2 decoder blocks
ENCODER_LAYERS=${ENCODER_LAYERS:-}
EMBED_DIM=${EMBED_DIM:-}
HEADS=${HEADS:-}
N_GPU=${N_GPU:-1}
BATCH_SIZE=${BATCH_SIZE:-$(recipe_if_cpu 16 128)}
UPDATE_FREQ=${UPDATE_FREQ:-$(recipe_if_cpu 1 2)}
MAX_EPOCH=${MAX_EPOCH:-$(recipe_if_cpu 2 30)}
MAX_UPDATE=${MAX_UPDATE:-0}             # 0: from epochs (published max_steps 4M is not binding)
LR=${LR:-5e-5}
MIN_LR=${MIN_LR:-1e-6}
WARMUP_UPDATES=${WARMUP_UPDATES:-$(recipe_if_cpu 100 1000)}  # code default; the paper appendix reportedly says 10,000
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
NUM_WORKERS=${NUM_WORKERS:-$(recipe_if_cpu 0 8)}
LOG_INTERVAL=${LOG_INTERVAL:-50}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}
FAIRSEQ_TRAIN=${FAIRSEQ_TRAIN:-fairseq-train}

if (($# < 2)); then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
LMDB_DIR=$1 SAVE_DIR=$2
shift 2

# total updates for the cosine schedule (published: per-epoch cosine over MAX_EPOCH epochs)
if [[ "$MAX_UPDATE" == 0 ]]; then
    if [[ -f "$LMDB_DIR/train.lmdb" ]]; then
        N_MOLS=$(recipe_num_entries "$LMDB_DIR/train.lmdb")
        if ((TRAIN_LIMIT > 0 && TRAIN_LIMIT < N_MOLS)); then N_MOLS=$TRAIN_LIMIT; fi
        N_MOLS=$((N_MOLS > VALID_FROM_TRAIN ? N_MOLS - VALID_FROM_TRAIN : 1))
    elif [[ "$DRY_RUN" == 1 ]]; then
        N_MOLS=3378406  # no LMDB yet: the published training part (all but 100 valid + 100 test)
    else
        recipe_die "$LMDB_DIR/train.lmdb does not exist (graphormer-ext-preprocess pcqm4mv2 ... --out $LMDB_DIR)"
    fi
    EFFECTIVE_BATCH=$((N_GPU * BATCH_SIZE * UPDATE_FREQ))
    MAX_UPDATE=$(( (N_MOLS + EFFECTIVE_BATCH - 1) / EFFECTIVE_BATCH * MAX_EPOCH ))
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
    --seed "$SEED" --log-format simple --log-interval "$LOG_INTERVAL")
recipe_opt CMD --encoder-layers "$ENCODER_LAYERS"
recipe_opt CMD --encoder-embed-dim "$EMBED_DIM"
recipe_opt CMD --encoder-attention-heads "$HEADS"
[[ "$PHYSICAL" == 1 ]] && CMD+=(--physical)
if [[ "$CPU" == 1 ]]; then CMD+=(--cpu); else CMD+=(--distributed-world-size "$N_GPU"); fi
CMD+=("$@")

if [[ "$DRY_RUN" == 1 ]]; then recipe_quote "${CMD[@]}"; exit 0; fi
mkdir -p "$SAVE_DIR"
recipe_save_command "$SAVE_DIR/command.sh" "${BASH_SOURCE[0]}" "${CMD[@]}"
"${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"
