#!/usr/bin/env bash
# Transformer-M L12 (47.1M parameters): PCQM4Mv2 pre-training, paper Table 1 / released L12.pt.
#
# Dataset : PCQM4Mv2, OGB-LSC 2021 release: 3,378,606 train molecules with DFT 3D structures
#           (pcqm4m-v2-train.sdf) / 73,545 valid molecules (2D only: validation is 2D inference).
# GPUs    : 4x A100 40GB, batch 256 per GPU (1,024 molecules per update), fp16.
# Time    : ~10 min per epoch on 4 A100; 1.5M updates ~= 455 epochs ~= 3 days.
# Target  : valid MAE 0.0785 eV (the released L12). fairseq's valid_loss is the MAE in eV;
#           the best value is in SAVE_DIR/train.log ("valid_best_loss") and checkpoint_best.pt.
#
# Usage   : pcqm4mv2_pretrain_L12.sh PCQM4MV2_ROOT LMDB_DIR SAVE_DIR [extra fairseq flags...]
#   PCQM4MV2_ROOT  the OGB root: pcqm4m-v2/ (raw/data.csv.gz, split_dict.pt) and
#                  pcqm4m-v2-train.sdf[.tar.gz]
#   LMDB_DIR       holds train.lmdb and valid.lmdb; written from PCQM4MV2_ROOT if absent
#                  (graphormer-ext-preprocess pcqm4mv2; done once, reused afterwards)
#   SAVE_DIR       checkpoints, train.log, tsb/ and command.sh (the resolved commands).
#                  Rerunning with the same SAVE_DIR resumes from checkpoint_last.pt.
# Env     : every variable below overrides its default; DRY_RUN=1 prints the resolved
#           commands and runs nothing; CPU=1 trains on CPU (--cpu, no fp16; smoke runs and
#           tests with tiny sizes, e.g. N_GPU=1 LAYERS=2 EMBED_DIM=16 TOTAL_UPDATES=4).
#
# Shortest paths: new runs use PATH_CONVENTION=fixed (Graphormer's corrected path-edge
# reconstruction). The released checkpoints were trained on the legacy paths of the original
# algos.pyx (paths through atom 0 read as one non-bond hop); use PATH_CONVENTION=legacy, with
# its own LMDB_DIR, only to replicate the release exactly. Likewise LEGACY_DROPPATH=1 restores
# the release's stochastic depth, which drops token positions across the batch instead of
# whole molecules.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=_lib.sh
source "$HERE/_lib.sh"

# --- hyperparameters (released train.sh, spec §2.1) -------------------------------------
CPU=${CPU:-0}
N_GPU=${N_GPU:-4}
BATCH_SIZE=${BATCH_SIZE:-256}            # per GPU
UPDATE_FREQ=${UPDATE_FREQ:-1}
ARCH=${ARCH:-transformer_m_base}
LAYERS=${LAYERS:-12}
EMBED_DIM=${EMBED_DIM:-768}
FFN_DIM=${FFN_DIM:-768}
HEADS=${HEADS:-32}
NUM_3D_KERNEL=${NUM_3D_KERNEL:-128}
MODE_PROB=${MODE_PROB:-0.2,0.2,0.6}      # p(2D+3D), p(2D), p(3D)
NOISE_SCALE=${NOISE_SCALE:-0.2}          # Å
DENOISE_WEIGHT=${DENOISE_WEIGHT:-1.0}
DROPPATH=${DROPPATH:-0.1}
LEGACY_DROPPATH=${LEGACY_DROPPATH:-0}
DROPOUT=${DROPOUT:-0.0}
ATTN_DROPOUT=${ATTN_DROPOUT:-0.1}
ACT_DROPOUT=${ACT_DROPOUT:-0.1}
LR=${LR:-2e-4}
END_LR=${END_LR:-1e-9}
WARMUP_UPDATES=${WARMUP_UPDATES:-150000}
TOTAL_UPDATES=${TOTAL_UPDATES:-1500000}
LR_POWER=${LR_POWER:-1}
ADAM_BETAS=${ADAM_BETAS:-"(0.9, 0.999)"}
ADAM_EPS=${ADAM_EPS:-1e-8}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.0}
CLIP_NORM=${CLIP_NORM:-5.0}
FP16=${FP16:-$(recipe_if_cpu 0 1)}
SEED=${SEED:-1}
DDP_BACKEND=${DDP_BACKEND:-legacy_ddp}
NUM_WORKERS=${NUM_WORKERS:-16}
DATA_BUFFER_SIZE=${DATA_BUFFER_SIZE:-20}
KEEP_LAST_EPOCHS=${KEEP_LAST_EPOCHS:-10}  # not in the release: bounds disk use
PATH_CONVENTION=${PATH_CONVENTION:-fixed}
PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-16}
# --- tools -------------------------------------------------------------------------------
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
TRAIN_BIN=${TRAIN_BIN:-transformer-m-train}
PREPROCESS_BIN=${PREPROCESS_BIN:-graphormer-ext-preprocess}

if (($# < 3)); then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
ROOT=$1 LMDB_DIR=$2 SAVE_DIR=$3
shift 3

recipe_ensure_lmdb "$ROOT" "$LMDB_DIR" "$PATH_CONVENTION" "$PREPROCESS_WORKERS" 1 train valid

flags=()
[[ "$FP16" == 1 ]] && flags+=(--fp16)
[[ "$LEGACY_DROPPATH" == 1 ]] && flags+=(--legacy-droppath)
[[ "$CPU" == 1 ]] && flags+=(--cpu --distributed-backend gloo)
cmd=(
    "$TORCHRUN" --standalone --nproc_per_node "$N_GPU" "$(recipe_which "$TRAIN_BIN")"
    --task graph_prediction --criterion graph_prediction --arch "$ARCH" --num-classes 1
    --dataset-name PCQM4M-LSC-V2-3D --data-path "$LMDB_DIR"
    --encoder-layers "$LAYERS" --encoder-embed-dim "$EMBED_DIM"
    --encoder-ffn-embed-dim "$FFN_DIM" --encoder-attention-heads "$HEADS"
    --add-3d --num-3d-bias-kernel "$NUM_3D_KERNEL" --mode-prob "$MODE_PROB"
    --noise-scale "$NOISE_SCALE" --denoise-weight "$DENOISE_WEIGHT"
    --droppath-prob "$DROPPATH" --dropout "$DROPOUT" --attention-dropout "$ATTN_DROPOUT"
    --act-dropout "$ACT_DROPOUT"
    --optimizer adam --adam-betas "$ADAM_BETAS" --adam-eps "$ADAM_EPS"
    --weight-decay "$WEIGHT_DECAY" --clip-norm "$CLIP_NORM"
    --lr-scheduler polynomial_decay --power "$LR_POWER" --lr "$LR" --end-learning-rate "$END_LR"
    --warmup-updates "$WARMUP_UPDATES" --total-num-update "$TOTAL_UPDATES"
    --max-update "$TOTAL_UPDATES"
    --batch-size "$BATCH_SIZE" --update-freq "$UPDATE_FREQ" --seed "$SEED"
    --distributed-world-size "$N_GPU" --ddp-backend "$DDP_BACKEND"
    --num-workers "$NUM_WORKERS" --data-buffer-size "$DATA_BUFFER_SIZE"
    --save-dir "$SAVE_DIR" --keep-last-epochs "$KEEP_LAST_EPOCHS"
    --tensorboard-logdir "$SAVE_DIR/tsb" --log-file "$SAVE_DIR/train.log"
    "${flags[@]}" "$@"
)

if [[ "$DRY_RUN" == 1 ]]; then
    recipe_quote "${cmd[@]}"
    exit 0
fi
mkdir -p "$SAVE_DIR"
recipe_save_command "$SAVE_DIR/command.sh" "${BASH_SOURCE[0]}" "${cmd[@]}"
exec "${cmd[@]}"
