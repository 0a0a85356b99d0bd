# Shared mechanics of the recipes in this folder (sourced, never run): preprocessing check,
# dry run, saving the resolved command. Hyperparameters live in the recipes themselves.
# Needs: DRY_RUN, PYTHON, PREPROCESS_BIN set by the caller (CPU for recipe_if_cpu).

# The preprocessing command a recipe ran (or would run), saved with the training command by
# recipe_save_command; empty unless the recipe sets it.
RECIPE_PREPROCESS_CMD=()

# recipe_if_cpu CPU_VALUE GPU_VALUE: the first with CPU=1, else the second (for the
# defaults of a recipe's CPU-sized demo: ARCH=${ARCH:-$(recipe_if_cpu small base)}).
recipe_if_cpu() {
    if [[ "${CPU:-0}" == 1 ]]; then echo "$1"; else echo "$2"; fi
}

# recipe_opt ARRAY FLAG VALUE: append "FLAG VALUE" to the array named ARRAY when VALUE is
# set (size variables whose empty default means "the architecture preset's value").
recipe_opt() {
    local -n _recipe_arr=$1
    if [[ -n "$3" ]]; then _recipe_arr+=("$2" "$3"); fi
}

# recipe_num_entries LMDB: records in an LMDB split (from its meta record), for the
# schedules computed from the dataset size.
recipe_num_entries() {
    "$PYTHON" -c 'import sys
from graphormer_ext.data.lmdb_dataset import LMDBDataset
print(len(LMDBDataset(sys.argv[1])))' "$1"
}

# Print a command on one line, shell-quoted (copy-pasteable).
recipe_quote() {
    local out="" arg
    for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
    printf '%s\n' "${out% }"
}

recipe_die() {
    echo "error: $*" >&2
    exit 2
}

# "<path_convention> <molecules with 3D>" from an LMDB split's meta record.
recipe_lmdb_meta() {
    "$PYTHON" -c 'import sys
from graphormer_ext.data.lmdb_dataset import LMDBDataset
meta = LMDBDataset(sys.argv[1]).meta
print(meta.get("path_convention"), meta.get("stats", {}).get("with_pos", 0))' "$1"
}

# recipe_ensure_lmdb ROOT OUT CONVENTION WORKERS NEED_3D SPLIT...
# Writes <OUT>/<split>.lmdb from the PCQM4Mv2 root unless all splits exist. Existing splits
# must have been written with CONVENTION; with NEED_3D=1 the train split must hold 3D
# positions (the train SDF must be in ROOT before preprocessing). Sets RECIPE_PREPROCESS_CMD
# (empty when nothing is to be done).
recipe_ensure_lmdb() {
    local root=$1 out=$2 convention=$3 workers=$4 need_3d=$5
    shift 5
    local split missing=() meta found with_pos
    for split in "$@"; do
        if [[ -f "$out/$split.lmdb" ]]; then
            meta=$(recipe_lmdb_meta "$out/$split.lmdb")
            read -r found with_pos <<<"$meta"
            [[ "$found" == "$convention" ]] || recipe_die "$out/$split.lmdb was written with" \
                "--path-convention $found, this run needs $convention (use another LMDB_DIR)"
            if [[ "$need_3d" == 1 && "$split" == train && "$with_pos" == 0 ]]; then
                recipe_die "$out/train.lmdb has no 3D positions (written without the train SDF)"
            fi
        else
            missing+=("$split")
        fi
    done
    RECIPE_PREPROCESS_CMD=()
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    if [[ "$DRY_RUN" != 1 ]]; then
        [[ -d "$root" ]] || recipe_die "PCQM4Mv2 root $root does not exist"
        if [[ "$need_3d" == 1 && " ${missing[*]} " == *" train "* ]] \
            && ! compgen -G "$root/pcqm4m-v2-train.sdf*" >/dev/null \
            && ! compgen -G "$root/pcqm4m-v2/pcqm4m-v2-train.sdf*" >/dev/null; then
            recipe_die "no pcqm4m-v2-train.sdf[.tar.gz|.gz] in $root: the 3D train split needs it"
        fi
    fi
    local splits
    splits=$(IFS=,; echo "${missing[*]}")
    RECIPE_PREPROCESS_CMD=("$PREPROCESS_BIN" pcqm4mv2 --root "$root" --out "$out"
        --splits "$splits" --path-convention "$convention" --workers "$workers" --no-progress)
    if [[ "$DRY_RUN" == 1 ]]; then
        recipe_quote "${RECIPE_PREPROCESS_CMD[@]}"
    else
        "${RECIPE_PREPROCESS_CMD[@]}"
    fi
}

# recipe_save_command FILE RECIPE CMD...: the resolved command (and preprocessing, if any).
recipe_save_command() {
    local file=$1 recipe=$2
    shift 2
    {
        echo "# resolved by $recipe on $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
        local commit
        if commit=$(git -C "$(dirname "$recipe")" rev-parse HEAD 2>/dev/null); then
            echo "# code: $commit"
        fi
        if ((${#RECIPE_PREPROCESS_CMD[@]})); then
            recipe_quote "${RECIPE_PREPROCESS_CMD[@]}"
        fi
        recipe_quote "$@"
    } >"$file"
}

# Absolute path of an executable on PATH (torchrun needs a script path), or the name itself.
recipe_which() {
    command -v "$1" 2>/dev/null || echo "$1"
}
