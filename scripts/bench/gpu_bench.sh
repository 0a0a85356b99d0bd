#!/usr/bin/env bash
# The training benchmark on one GPU machine, set-up included: one command.
#
# Machine : the project's GPU machine (one H200, Python 3.12, torch 2.11 + CUDA, no network,
#           no fairseq/lmdb installed; see the GPU README handed to sessions). The cp312 wheels
#           of fairseq-fixed 0.12.3.1, lmdb, bitarray, hydra-core, omegaconf and antlr4 must
#           sit in WHEELS (default: .gpu/ in the checkout, an ignored folder carried along).
# Does    : installs the wheels into /tmp/site, builds the Cython extension, then runs
#           scripts/bench/bench_train.py --preset h200 (Transformer-M L12 batch 256 with today's
#           flags and the new ones, fast and reference paths, bf16 autocast, GeoMFormer and
#           3D-GSRD; LMDB of 200,000 records in /dev/shm). Extra arguments go to bench_train.py;
#           PRESET=h200-compile runs the torch.compile configurations instead.
#           Before it, when pytest can be imported there (carry the wheels of pytest, pluggy,
#           iniconfig and packaging in WHEELS too), the CUDA tests
#           (`pytest -m gpu`: fast path vs reference on the device, half precision, fused_adam)
#           run and their summary goes to gpu_tests.txt; their failure is the exit status.
# Output  : OUT (default $OUT of the run tool, else ./runs/gpu_bench): bench_train.txt (the
#           table), bench_train.json (all figures), logs/ (each fairseq-train's log).
# Time    : about 4-5 minutes (set-up ~40 s, data ~30 s, benchmark ~3 min).
# Env     : PRESET (h200), TIME_BUDGET (330 s for start-up and measurement: fewer rounds if
#           short), PYTHON (python3), WHEELS, SITE, OUT, SHM (/dev/shm), SKIP_BUILD=1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/.gpu}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-$REPO/runs/gpu_bench}
SHM=${SHM:-/dev/shm}
cd "$REPO"
mkdir -p "$OUT/logs"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        "${wheels[@]}"
fi
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
[[ "${SKIP_BUILD:-0}" == 1 ]] || "$PYTHON" setup.py build_ext --inplace -q
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        | tee "$OUT/gpu.txt"
fi
"$PYTHON" -c 'import torch, fairseq; print("torch", torch.__version__, "fairseq", fairseq.__version__)' \
    | tee -a "$OUT/gpu.txt"

status=0
if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rs tests/transformer_m 2>&1 \
        | tail -n 40 | tee "$OUT/gpu_tests.txt" || true
    grep -qE '(failed|error)' "$OUT/gpu_tests.txt" && status=1
else
    echo "pytest is not installed here: CUDA tests not run (see the header)" | tee "$OUT/gpu_tests.txt"
fi
"$PYTHON" scripts/bench/bench_train.py --preset "${PRESET:-h200}" --lmdb-dir "$SHM/tm_bench_lmdb" \
    --work-dir "$SHM/tm_bench_runs" --json "$OUT/bench_train.json" \
    --time-budget "${TIME_BUDGET:-330}" "$@" \
    2>&1 | tee "$OUT/bench_train.txt" || status=$((status ? status : 1))
cp "$SHM"/tm_bench_runs/*.log "$OUT/logs/" 2>/dev/null || true
exit "$status"
