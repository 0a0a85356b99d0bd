#!/usr/bin/env bash
# One command from a user CSV/SDF to a validated fine-tuned Transformer-M checkpoint:
# preprocess (graphormer-ext-preprocess csv|sdf) -> fairseq-train (graph_prediction_qm9, from a
# pre-trained checkpoint with --finetune-from-model --remove-head) -> fairseq-validate.
# All arguments go to `python -m transformer_m.finetune_user` (see --help), e.g.
#   scripts/finetune_user.sh --csv mols.csv --smiles-column smiles --label-columns logS \
#       --pretrained runs/L12/checkpoint_best.pt --out runs/logS
set -euo pipefail
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m transformer_m.finetune_user "$@"
