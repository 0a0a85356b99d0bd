#!/usr/bin/env bash
# One command from your CSV/SDF to a validated Transformer-M and a report against baselines:
# preprocess (graphormer-ext-preprocess csv|sdf) -> fairseq-train (graph_prediction_qm9, from
# scratch or from a pre-trained checkpoint) -> fairseq-validate -> summary.json, per-molecule
# predictions, parity/ROC plot, and the model beside the train mean and an RDKit-descriptor random
# forest on the same molecules. All arguments go to `python -m transformer_m.finetune_user`
# (see --help), e.g.
#   scripts/finetune_user.sh --csv mols.csv --smiles-column smiles --label-columns logS \
#       --out runs/logS [--pretrained runs/L12/checkpoint_best.pt]
# Python: $PYTHON if set, else the project's .venv (bootstrap.sh), else the active virtualenv,
# else python3 on PATH; it must be able to import transformer_m. No activated venv is needed.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY=$ROOT/.venv/bin/python
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PY=$VIRTUAL_ENV/bin/python
else
    PY=$(command -v python3 || command -v python || true)
fi
if [[ -z "$PY" ]] || ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('transformer_m') is None)" 2>/dev/null; then
    echo "error: no Python that can import transformer_m (tried \$PYTHON, $ROOT/.venv/bin/python," \
        "\$VIRTUAL_ENV, python3): run 'bash bootstrap.sh' in $ROOT, or set PYTHON=/path/to/python" >&2
    exit 2
fi
exec "$PY" -m transformer_m.finetune_user "$@"
