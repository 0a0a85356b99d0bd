#!/usr/bin/env bash
# One-command environment: creates .venv, installs the pinned torch first, then this package with
# fairseq-fixed compiled without build isolation against that torch/numpy (see README, "Install").
# Idempotent: a stamp records the hash of every input; a second run with nothing changed takes seconds.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1
set -o pipefail
# pip, minus the harmless "Location ... is ignored" lines some pip configurations print per package;
# awk always exits 0, so pipefail still reports pip's own failure.
pip_q() {
  "$VENV/bin/python" -m pip "$@" 2>&1 | awk '!/is ignored: it is neither a file nor a directory/'
}

inputs_hash() {
  cat constraints.txt setup.py pyproject.toml graphormer_ext/*.pyx | sha256sum | cut -c1-16
}
want=$(inputs_hash)
stamp="$VENV/.bootstrap-stamp"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$VENV/bin/python" -c "import graphormer_ext.algos, fairseq, transformer_m" 2>/dev/null; then
  echo "[bootstrap] environment up to date ($VENV, inputs $want)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi

echo "[bootstrap] step 1/3: pinned torch, numpy and build tools"
pip_q install -q -c constraints.txt torch numpy cython setuptools wheel

echo "[bootstrap] step 2/3: runtime and test dependencies"
pip_q install -q -c constraints.txt rdkit ogb lmdb tqdm pandas matplotlib scipy pytest \
  hydra-core omegaconf bitarray scikit-learn qm9pack tensorboardX ase tblite

echo "[bootstrap] step 3/3: this package + fairseq-fixed (compiled once, ~4 min on 2 cores)"
pip_q install -q --no-cache-dir -c constraints.txt --no-build-isolation -e ".[fairseq,featurize,plot,test,qm9]"

"$VENV/bin/python" -c "import graphormer_ext.algos, fairseq, transformer_m; print('[bootstrap] imports ok')"
echo "$want" > "$stamp"
echo "[bootstrap] done"
