#!/usr/bin/env bash
# Evaluate the released Transformer-M checkpoints (L12.pt, L18.pt) on the PCQM4Mv2 valid split.
#
# Dataset : PCQM4Mv2, OGB-LSC 2021 release: 3,378,606 train / 73,545 valid molecules; only the
#           valid split is featurized and used here (2D inference, as in the release).
# GPUs    : one GPU (any; an A100 40GB was used for the released numbers), batch 256. CPU works
#           with DEVICE=cpu, slowly.
# Time    : featurizing valid once, then a few minutes of inference per checkpoint on one GPU
#           (estimate).
# Target  : valid MAE 0.0785 eV (L12.pt) / 0.0772 eV (L18.pt), the released numbers.
#
# Usage   : evaluate_released.sh PCQM4MV2_ROOT LMDB_DIR CKPT_DIR OUT_DIR [extra evaluator flags...]
#   PCQM4MV2_ROOT  the OGB root holding pcqm4m-v2/ (raw/data.csv.gz, split_dict.pt)
#   LMDB_DIR       holds valid.lmdb written with --path-convention legacy; written if absent.
#                  Do not reuse a training LMDB_DIR of the fixed convention.
#   CKPT_DIR       holds the released L12.pt and/or L18.pt
#   OUT_DIR        per model: <model>/ (the evaluator's predictions, <split>_metrics.json,
#                  parity plot), eval_<model>.log and command_<model>.sh (resolved command)
# Env     : every variable below overrides its default; DRY_RUN=1 prints the resolved
#           commands and runs nothing.
#
# Shortest paths: the released checkpoints were trained on the legacy paths of the original
# algos.pyx (paths through atom 0 read as one non-bond hop), so they are evaluated on legacy
# data. New checkpoints trained by pcqm4mv2_pretrain_L*.sh use the fixed convention.
set -euo pipefail

MODELS=${MODELS:-"L12 L18"}
SPLIT=${SPLIT:-valid}
BATCH_SIZE=${BATCH_SIZE:-256}
DEVICE=${DEVICE:-cuda}
PATH_CONVENTION=${PATH_CONVENTION:-legacy}   # what the released checkpoints were trained on
PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-16}
# --- tools -------------------------------------------------------------------------------
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}
PREPROCESS_BIN=${PREPROCESS_BIN:-graphormer-ext-preprocess}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EVALUATOR=${EVALUATOR:-"$(dirname "$HERE")/evaluate/evaluate_pcqm4mv2.py"}

# shellcheck source=_lib.sh
source "$HERE/_lib.sh"

if (($# < 4)); then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
ROOT=$1 LMDB_DIR=$2 CKPT_DIR=$3 OUT_DIR=$4
shift 4

declare -A TARGET=([L12]=0.0785 [L18]=0.0772)
for model in $MODELS; do
    [[ -n "${TARGET[$model]:-}" ]] || recipe_die "MODELS: unknown model $model (L12 or L18)"
    [[ "$DRY_RUN" == 1 || -f "$CKPT_DIR/$model.pt" ]] || recipe_die "missing $CKPT_DIR/$model.pt"
done
[[ "$DRY_RUN" == 1 || -f "$EVALUATOR" ]] || recipe_die "evaluator $EVALUATOR not found"

recipe_ensure_lmdb "$ROOT" "$LMDB_DIR" "$PATH_CONVENTION" "$PREPROCESS_WORKERS" 0 "$SPLIT"

[[ "$DRY_RUN" == 1 ]] || mkdir -p "$OUT_DIR"
for model in $MODELS; do
    cmd=(
        "$PYTHON" "$EVALUATOR" --released "$model" --checkpoint "$CKPT_DIR/$model.pt"
        --data-path "$LMDB_DIR" --split "$SPLIT" --batch-size "$BATCH_SIZE" --device "$DEVICE"
        --out "$OUT_DIR/$model" --no-progress "$@"
    )
    if [[ "$DRY_RUN" == 1 ]]; then
        recipe_quote "${cmd[@]}"
        continue
    fi
    recipe_save_command "$OUT_DIR/command_$model.sh" "${BASH_SOURCE[0]}" "${cmd[@]}"
    echo "== $model: expected valid MAE ${TARGET[$model]} eV" | tee "$OUT_DIR/eval_$model.log"
    "${cmd[@]}" 2>&1 | tee -a "$OUT_DIR/eval_$model.log"
    metrics="$OUT_DIR/$model/${SPLIT}_metrics.json"
    if [[ -f "$metrics" ]]; then
        mae=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["mae"])' \
            "$metrics")
        echo "== $model: $SPLIT MAE $mae eV (expected ${TARGET[$model]})" \
            | tee -a "$OUT_DIR/eval_$model.log"
    fi
done
