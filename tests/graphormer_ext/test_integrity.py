"""Integrity of preprocessing: safe split names, exclusive writers, no silent input changes,
clear errors on bad bytes, provenance of every record, fuzzed inputs (issues 10 and 12)."""

import csv
import fcntl
import gzip
import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

Chem = pytest.importorskip("rdkit.Chem")
from rdkit.Chem import AllChem  # noqa: E402

from graphormer_ext.data import keys as K  # noqa: E402
from graphormer_ext.data.lmdb_dataset import LMDBDataset, close_envs  # noqa: E402
from graphormer_ext.data.lmdb_writer import (  # noqa: E402
    LOCK_NAME,
    OutputBusyError,
    output_lock,
    skip_list_path,
    write_split,
)
from graphormer_ext.data.provenance import iter_provenance, record_provenance  # noqa: E402
from graphormer_ext.featurize.pipeline import featurize_record  # noqa: E402
from graphormer_ext.preprocess import build_parser, export_rows, main  # noqa: E402
from graphormer_ext.sources.base import (  # noqa: E402
    MoleculeError,
    SourceError,
    SourceRecord,
)
from graphormer_ext.sources.custom import CSVSource, SDFSource  # noqa: E402

SMILES = ["CCO", "c1ccccc1", "CC(=O)N", "OC(=O)CCl", "C1CC1", "CCN(C)C", "O=CC=O", "FC(F)F"]


def _write(path, text, encoding="utf-8"):
    data = text.encode(encoding) if isinstance(text, str) else text
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _csv_args(path, out, *extra):
    return ["csv", "--path", str(path), "--smiles-column", "smiles", "--label-columns", "y",
            "--out", str(out), "--workers", "1", "--no-progress", *extra]  # fmt: skip


def _sdf_text(smiles, props):
    out = io.StringIO()
    writer = Chem.SDWriter(out)
    for i, smi in enumerate(smiles):
        mol = Chem.AddHs(Chem.MolFromSmiles(smi))
        assert AllChem.EmbedMolecule(mol, randomSeed=i) == 0
        mol.SetProp("_Name", f"mol-{i}")
        for key, value in props[i].items():
            mol.SetProp(key, str(value))
        writer.write(mol)
    writer.close()
    return out.getvalue()


# --- issue 10 item 2: split names are file names --------------------------------------------------
@pytest.mark.parametrize("name", ["../escaped", "/abs/where", "a/b", ".hidden", "..", "x y", ""])
def test_csv_split_names_must_be_safe(tmp_path, name):
    path = _write(tmp_path / "d.csv", f"smiles,y,fold\nCCO,1,train\nCC,2,{name}\n")
    out = tmp_path / "data" / "out"
    with pytest.raises(SourceError, match=r"d\.csv line 3"):
        CSVSource(path, label_columns=["y"], split_column="fold")
    assert main(_csv_args(path, out, "--split-column", "fold")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]  # nothing written anywhere


def test_sdf_split_names_must_be_safe(tmp_path):
    text = _sdf_text(SMILES[:2], [{"fold": "train"}, {"fold": "../../x"}])
    path = _write(tmp_path / "d.sdf", text)
    with pytest.raises(SourceError, match=r"d\.sdf record 2 \(line \d+\) property 'fold': "
                                          r"split name '\.\./\.\./x' is not allowed"):
        SDFSource(path, split_property="fold")


def test_overwrite_cannot_reach_another_dataset(tmp_path):
    other = tmp_path / "other"
    assert main(_csv_args(_write(tmp_path / "o.csv", "smiles,y\nCCO,1\nCC,2\nCCN,3\n"), other,
                          "--split-fractions", "1", "0", "0")) == 0
    before = (other / "train.lmdb").read_bytes()
    path = _write(tmp_path / "d.csv", "smiles,y,fold\nCCO,1,train\nCC,2,../other/train\n")
    assert main(_csv_args(path, tmp_path / "mine", "--split-column", "fold",
                          "--overwrite")) == 2
    assert (other / "train.lmdb").read_bytes() == before


# --- issue 10 item 3: one writer per output folder ------------------------------------------------
def test_second_writer_on_same_out_is_refused(tmp_path, caplog):
    path = _write(tmp_path / "d.csv", "smiles,y\n" + "".join(f"{s},{i}\n" for i, s in
                                                             enumerate(SMILES)))
    out = tmp_path / "out"
    out.mkdir()
    # another process holds the folder: lock the file the way a running preprocess does
    with open(out / LOCK_NAME, "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with caplog.at_level(logging.ERROR):
            assert main(_csv_args(path, out)) == 2
        assert "being written by another process (pid 4242)" in caplog.text
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
        with pytest.raises(OutputBusyError):
            write_split(out / "train.lmdb", [], split="train", workers=1, progress=False)
    assert main(_csv_args(path, out)) == 0  # released: the next run works
    assert sorted(p.name for p in out.iterdir()) == [
        "test.lmdb", "test.skipped.tsv", "train.lmdb", "train.skipped.tsv", "valid.lmdb",
        "valid.skipped.tsv"]  # fmt: skip


def test_lock_excludes_another_process(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time\nfrom graphormer_ext.data.lmdb_writer import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n"
            "    sys.stdin.read()\n")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=f"pid {proc.pid}"):
            with output_lock(out):
                pass
    finally:
        proc.communicate("", timeout=60)
    with output_lock(out):  # re-entrant within one process
        with output_lock(out):
            assert (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()


def test_target_rechecked_at_rename(tmp_path):
    path = tmp_path / "train.lmdb"

    def records():
        yield from (SourceRecord("train", i, f"r{i}", "smiles", s) for i, s in
                    enumerate(SMILES[:3]))  # fmt: skip
        path.write_bytes(b"written by someone else meanwhile")

    with pytest.raises(FileExistsError, match="appeared while this run was writing it"):
        write_split(path, records(), split="train", workers=1, progress=False)
    assert path.read_bytes() == b"written by someone else meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.lmdb"]  # no temp files left


# --- issue 10 item 9: stale temp files ------------------------------------------------------------
def test_stale_temp_files_of_dead_writers_are_removed(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    stale = [tmp_path / f"train.lmdb.tmp-{pid}", tmp_path / f"valid.skipped.tsv.tmp-{pid}"]
    for p in stale:
        p.write_bytes(b"\0" * 4096)
    keep = tmp_path / "notes.tmp-1"
    keep.write_text("not ours")
    with caplog.at_level(logging.WARNING):
        write_split(tmp_path / "train.lmdb", [SourceRecord("train", 0, "r0", "smiles", "CCO")],
                    split="train", workers=1, progress=False)  # fmt: skip
    assert not any(p.exists() for p in stale) and keep.exists()
    for p in stale:
        assert f"removing {p}: a temporary file left by an interrupted writer (pid {pid}" in (
            caplog.text)


# --- issue 10 item 5: inputs are never changed silently -------------------------------------------
def test_whitespace_in_smiles_is_a_counted_skip(tmp_path):
    path = _write(tmp_path / "d.csv", "smiles,y\nCCO,1\nCC O,2\n\"c1ccccc1 benzene\",3\n"
                                      "CC\tN,4\n  CCN  ,5\nCC\x00,6\n")  # fmt: skip
    out = tmp_path / "out"
    assert main(_csv_args(path, out, "--split-fractions", "1", "0", "0")) == 0
    ds = LMDBDataset(out / "train.lmdb")
    assert ds.meta["counts"] == {"read": 6, "kept": 2, "skipped": 4}
    assert [record_provenance(ds[i])["smiles"] for i in range(len(ds))] == ["CCO", "CCN"]
    with open(skip_list_path(out / "train.lmdb")) as f:
        skipped = list(csv.reader(f, delimiter="\t"))[1:]
    assert [s[0] for s in skipped] == ["d.csv line 3 (train #1)", "d.csv line 4 (train #2)",
                                       "d.csv line 5 (train #3)", "d.csv line 7 (train #5)"]
    assert [s[1].split(";")[0].split(" contains ")[1] for s in skipped] == [
        "whitespace"] * 3 + ["a control character"]  # fmt: skip


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "1e39", "-1e39"])
def test_infinite_labels_are_errors(tmp_path, value):
    path = _write(tmp_path / "d.csv", f"smiles,y\nCCO,1\nCC,{value}\n")
    with pytest.raises(SourceError, match=rf"d\.csv line 3 column 'y': label '{value}' is not "
                                          r"a finite float32 number; .*leave the cell empty"):
        CSVSource(path, label_columns=["y"])
    sdf = _write(tmp_path / "d.sdf", _sdf_text(SMILES[:2], [{"y": 1}, {"y": value}]))
    with pytest.raises(SourceError, match=r"d\.sdf record 2 \(line \d+\) property 'y'"):
        SDFSource(sdf, label_properties=["y"])


def test_featurize_rejects_infinite_labels():
    rec = SourceRecord("train", 0, "r0", "smiles", "CCO", y=np.array([np.inf], np.float32))
    with pytest.raises(MoleculeError, match="infinite label"):
        featurize_record(rec)


def test_duplicates_counted_in_meta_and_reported(tmp_path, caplog):
    rows = "smiles,y,fold\nCCO,1,train\nCC,2,train\nCCO,1,train\nCCO,5,valid\nCC,2,test\n"
    path = _write(tmp_path / "d.csv", rows)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(_csv_args(path, out, "--split-column", "fold")) == 0
    dup = LMDBDataset(out / "valid.lmdb").meta["source"]["describe"]["duplicates"]
    assert dup == {"rows": 3, "smiles": 2, "conflicting_labels": 1, "across_splits": 2,
                   "examples": [[2, 4], [2, 5], [3, 6]]}  # fmt: skip
    assert "3 rows repeat the SMILES of an earlier row" in caplog.text


@pytest.mark.parametrize("text", ["", "\n\n", "smiles,y\n", "smiles,y\n\n\n"])
def test_empty_csv_is_an_error(tmp_path, text):
    path = _write(tmp_path / "d.csv", text)
    with pytest.raises(SourceError, match=r"d\.csv: (empty file|no data rows)"):
        CSVSource(path, label_columns=["y"])
    assert main(_csv_args(path, tmp_path / "out")) == 2
    assert not list((tmp_path / "out").glob("*.lmdb")) if (tmp_path / "out").exists() else True


def test_empty_sdf_is_an_error(tmp_path):
    with pytest.raises(SourceError, match=r"d\.sdf: no molecule records"):
        SDFSource(_write(tmp_path / "d.sdf", "\n"))


def test_row_with_extra_fields_is_an_error(tmp_path):
    path = _write(tmp_path / "d.csv", "smiles,y\nCCO,1\nCCO,ethanol, 95%,1\nCC,2,\n")
    with pytest.raises(SourceError, match=r"d\.csv line 3: 4 fields but the header has 2; "
                                          r"quote fields"):
        CSVSource(path, label_columns=["y"])


# --- issue 10 item 7 (data side): encodings -------------------------------------------------------
@pytest.mark.parametrize("name", ["d.csv", "d.csv.gz"])
def test_non_utf8_csv_names_line_and_fix(tmp_path, name, caplog):
    path = _write(tmp_path / name, "smiles,y,name\nCCO,1,ethanol\nCC,2,\u00e9thane\n",
                  encoding="latin-1")  # fmt: skip
    with pytest.raises(SourceError, match=rf"{name} line 3: not UTF-8 text \(byte 0xe9 at "
                                          r"column 6\); save the file as UTF-8"):
        CSVSource(path, label_columns=["y"])
    with caplog.at_level(logging.ERROR):
        assert main(_csv_args(path, tmp_path / "out")) == 2
    assert "line 3: not UTF-8 text" in caplog.text


def test_utf8_bom_header(tmp_path):
    path = _write(tmp_path / "d.csv", "\ufeffsmiles,y\nCCO,1\nCC,2\n")
    src = CSVSource(path, label_columns=["y"], split_fractions=(1.0,))
    assert [r.text for r in src.iter_split("train")] == ["CCO", "CC"]


# --- issue 12 item 6: delimiters and line numbers -------------------------------------------------
@pytest.mark.parametrize("sep,name,flag", [("\t", "d.txt", None), (";", "d.csv", None),
                                           ("|", "d.dat", None), ("\t", "d.csv", "tab"),
                                           ("\t", "d.tsv.gz", None), (",", "d.tsv", None),
                                           (":", "d.csv", ":")])
def test_delimiter_detected_or_given(tmp_path, sep, name, flag):
    text = f"id{sep}smiles{sep}y\n" + "".join(f"m{i}{sep}{s}{sep}{i}\n" for i, s in
                                              enumerate(SMILES))  # fmt: skip
    path = _write(tmp_path / name, text)
    src = CSVSource(path, label_columns=["y"], delimiter=flag, split_fractions=(1.0,))
    assert [r.text for r in src.iter_split("train")] == SMILES
    assert src.describe()["delimiter"] == sep
    out = tmp_path / "out"
    extra = ["--delimiter", flag] if flag else []
    assert main(_csv_args(path, out, "--split-fractions", "1", "0", "0", *extra)) == 0
    assert LMDBDataset(out / "train.lmdb").meta["num_entries"] == len(SMILES)


def test_wrong_delimiter_lists_columns_and_names_the_flag(tmp_path):
    path = _write(tmp_path / "d.txt", "smiles\ty\nCCO\t1\n")
    with pytest.raises(SourceError, match=r"no column \['smiles', 'y'\]; available columns: "
                                          r"\['smiles\\ty'\] \(delimiter semicolon; set "
                                          r"--delimiter"):
        CSVSource(path, label_columns=["y"], delimiter=";")
    with pytest.raises(SourceError, match="unknown delimiter 'colon'"):
        CSVSource(path, label_columns=["y"], delimiter="colon")


def test_help_documents_delimiter():
    sub = build_parser()._subparsers._group_actions[0].choices["csv"]
    text = sub.format_help()
    assert "--delimiter" in text and ".tsv" in text and ".txt" in text
    assert ".csv or .csv.gz" not in text


def test_messages_name_file_lines(tmp_path):
    # line 1 header, 2 row, 3 blank, 4-5 a quoted two-line field, 6 the bad row
    path = _write(tmp_path / "d.csv", 'smiles,y,note\nCCO,1,a\n\nCC,2,"two\nlines"\nCCN,x,b\n')
    with pytest.raises(SourceError, match=r"d\.csv line 6 column 'y': label 'x' is not a "
                                          "number"):
        CSVSource(path, label_columns=["y"])
    path = _write(tmp_path / "d.csv", 'smiles,y,note\nCCO,1,a\n\nCC,2,"two\nlines"\nC1C,3,b\n')
    src = CSVSource(path, label_columns=["y"], split_fractions=(1.0,))
    recs = list(src.iter_split("train"))
    assert [r.source_row for r in recs] == [2, 4, 6]
    assert recs[2].item == "d.csv line 6 (train #2)"
    out = tmp_path / "out.lmdb"
    write_split(out, src, split="train", workers=1, progress=False)
    with open(skip_list_path(out)) as f:
        assert f.read().splitlines()[1].startswith("d.csv line 6 (train #2)\tunparsable SMILES")


def test_sdf_records_name_their_lines(tmp_path):
    text = _sdf_text(SMILES[:4], [{"y": i} for i in range(4)])
    path = _write(tmp_path / "d.sdf", text)
    src = SDFSource(path, label_properties=["y"], split_fractions=(1.0,))
    lines = text.split("\n")
    for k, rec in enumerate(src.iter_split("train")):
        line = int(rec.item.split("(line ")[1].split(")")[0])
        assert rec.item.startswith(f"d.sdf record {k + 1} (line {line}) 'mol-{k}'")
        assert lines[line - 1] == f"mol-{k}"  # the record's title line


def test_sdf_non_utf8_bytes_are_reported_not_silently_replaced(tmp_path, caplog):
    """A Latin-1 title is read with U+FFFD in place of its byte: said in the log, counted in the
    source description (and so in the meta); a label made unreadable is refused."""
    text = _sdf_text(SMILES[:3], [{"y": i} for i in range(3)])
    data = text.replace("mol-1", "mol-\xe9").encode("latin-1")
    path = _write(tmp_path / "d.sdf", data)
    with caplog.at_level(logging.WARNING):
        src = SDFSource(path, label_properties=["y"], split_fractions=(1.0,))
    assert src.describe()["non_utf8_records"] == 1
    assert any("1 record(s) hold bytes that are not UTF-8 (record 2 (line" in r.getMessage()
               for r in caplog.records)
    assert src.titles[1] == "mol-\ufffd"
    clean = SDFSource(_write(tmp_path / "ok.sdf", text), label_properties=["y"],
                      split_fractions=(1.0,))
    assert clean.describe()["non_utf8_records"] == 0
    bad_label = text.replace(">  <y>  (2) \n2\n", ">  <y>  (2) \n2\xe9\n")
    if bad_label == text:  # RDKit's property header format differs: replace the value line
        blocks = text.split("$$$$\n")
        blocks[2] = blocks[2].replace("\n2\n", "\n2\xe9\n")
        bad_label = "$$$$\n".join(blocks)
    assert bad_label != text
    with pytest.raises(SourceError, match="record 3 .* label '2\ufffd' is not a number"):
        SDFSource(_write(tmp_path / "bad.sdf", bad_label.encode("latin-1")),
                  label_properties=["y"], split_fractions=(1.0,))


# --- issue 12 item 7: provenance and split assignment ---------------------------------------------
def test_records_store_smiles_id_and_line_and_meta_the_assignment(tmp_path, capsys):
    rows = [("m0", "CCO", 1, "train"), ("m1", "not-a-smiles", 2, "train"),
            ("m2", "c1ccccc1", 3, "valid"), ("m3", "CC(=O)N", 4, "train"),
            ("m4", "OC(=O)CCl", 5, "test")]  # fmt: skip
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "smiles", "y", "fold"])
        w.writerows(rows)
    out = tmp_path / "out"
    assert main(_csv_args(path, out, "--split-column", "fold", "--id-column", "id")) == 0
    train = LMDBDataset(out / "train.lmdb")
    assert train.meta["source_rows"] == [2, 3, 5]
    assert [record_provenance(train[i]) for i in range(len(train))] == [
        {"smiles": "CCO", "source_id": "m0", "source_row": 2},
        {"smiles": "CC(=O)N", "source_id": "m3", "source_row": 5}]  # fmt: skip
    assert train[0][K.SMILES].dtype == np.uint8 and train[0][K.SOURCE_ROW].dtype == np.int64
    assert LMDBDataset(out / "valid.lmdb").meta["source_rows"] == [4]
    capsys.readouterr()
    assert main(["export", str(out)]) == 0
    got = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by_line = {int(r["source_row"]): r for r in got}
    assert sorted(by_line) == [2, 3, 4, 5, 6]  # every input row, once
    for line, (mid, smi, _, fold) in zip(range(2, 7), rows):
        r = by_line[line]
        assert r["split"] == fold
        if smi == "not-a-smiles":
            assert r["status"] == "skipped" and "unparsable SMILES" in r["reason"]
            assert r["index"] == "" and r["smiles"] == ""
        else:
            assert r["status"] == "written" and r["smiles"] == smi and r["source_id"] == mid
    out_csv = tmp_path / "rows.csv"
    assert main(["export", str(out / "train.lmdb"), "--output", str(out_csv)]) == 0
    assert out_csv.read_text().splitlines()[0] == (
        "split,index,status,source_row,source_id,smiles,reason")


def test_sdf_provenance_is_record_number_title_and_canonical_smiles(tmp_path):
    path = _write(tmp_path / "d.sdf", _sdf_text(["OCC", "N#CC"], [{"y": 1}, {"y": 2}]))
    out = tmp_path / "train.lmdb"
    write_split(out, SDFSource(path, label_properties=["y"], split_fractions=(1.0,)),
                split="train", workers=1, progress=False)  # fmt: skip
    ds = LMDBDataset(out)
    assert [record_provenance(ds[i]) for i in range(2)] == [
        {"smiles": "CCO", "source_id": "mol-0", "source_row": 1},
        {"smiles": "CC#N", "source_id": "mol-1", "source_row": 2}]  # fmt: skip
    assert ds.meta["source_rows"] == [1, 2]


# --- fuzz: every input row is accounted for -------------------------------------------------------
_GARBAGE = ["", " ", "C(", "c1ccc", "Xx", "C1CC", "[Na+].[Cl-]", "CC O", "C\u00e9C", "\"C,C\"",
            "C" * 200, "[H]", "*", "C=C=C=C", "N(C)(C)(C)(C)C", "c1cccc1", "[13CH4]", "C.C"]


def _fuzz_csv(rng, n):
    rows = []
    for i in range(n):
        smi = (SMILES[int(rng.integers(len(SMILES)))] if rng.random() < 0.5
               else _GARBAGE[int(rng.integers(len(_GARBAGE)))])  # fmt: skip
        y = ["", "nan", "NA", f"{rng.normal():.3f}", " 7 "][int(rng.integers(5))]
        rows.append((smi, y, f"id{i}"))
    return rows


@pytest.mark.parametrize("seed", range(3))
def test_fuzz_csv_rows_all_accounted_for(tmp_path, seed):
    rng = np.random.default_rng(seed)
    rows = _fuzz_csv(rng, 40)
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["smiles", "y", "id"])
        for k, row in enumerate(rows):
            w.writerow(row)
            if k % 7 == 3:
                f.write("\n")  # blank lines shift file lines, not rows
    out = tmp_path / "out"
    assert main(_csv_args(path, out, "--id-column", "id", "--seed", str(seed))) == 0
    buf = io.StringIO()
    export_rows(out, buf)
    got = list(csv.DictReader(io.StringIO(buf.getvalue())))
    text_lines = path.read_text(encoding="utf-8").split("\n")
    by_id = {i: (smi, y) for smi, y, i in rows}
    seen = []
    for r in got:  # each exported row points at its own input line
        smi, y, row_id = next(csv.reader([text_lines[int(r["source_row"]) - 1]]))
        seen.append(row_id)
        assert (smi, y) == by_id[row_id]
        if r["status"] == "written":
            assert r["source_id"] == row_id and r["smiles"] == smi.strip()
        else:
            assert r["status"] == "skipped" and r["reason"]
            assert smi not in SMILES  # only malformed rows are skipped
    assert sorted(seen) == sorted(by_id)  # every input row exactly once
    for split in ("train", "valid", "test"):
        c = LMDBDataset(out / f"{split}.lmdb").meta["counts"]
        assert c["read"] == c["kept"] + c["skipped"]


def _fuzz_block(rng, block):
    lines = block.split("\n")
    kind = int(rng.integers(6))
    if kind == 0:  # truncate
        return "\n".join(lines[: int(rng.integers(1, len(lines)))])
    if kind == 1:  # corrupt the counts line
        lines[3] = "xx" + lines[3][2:]
    elif kind == 2:  # a coordinate becomes text or NaN
        j = int(rng.integers(4, 6))
        lines[j] = ["    nan", "   abcd"][int(rng.integers(2))] + lines[j][10:]
    elif kind == 3:  # an unknown element
        j = int(rng.integers(4, 6))
        lines[j] = lines[j][:31] + "Qq " + lines[j][34:]
    elif kind == 4:  # random bytes replaced
        s = list(block)
        for _ in range(5):
            s[int(rng.integers(len(s)))] = chr(int(rng.integers(32, 127)))
        return "".join(s)
    else:  # drop the bond block's end
        lines = [ln for ln in lines if not ln.startswith("M  END")]
    return "\n".join(lines)


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_sdf_records_all_accounted_for(tmp_path, seed):
    rng = np.random.default_rng(seed)
    text = _sdf_text(SMILES, [{"y": i} for i in range(len(SMILES))])
    blocks = [b for b in text.split("$$$$\n") if b.strip()]
    for i in range(len(blocks)):
        if rng.random() < 0.6:
            body, sep, props = blocks[i].partition("M  END")
            blocks[i] = _fuzz_block(rng, body + sep) + props
    path = _write(tmp_path / "d.sdf", "".join(b + "$$$$\n" for b in blocks))
    try:
        src = SDFSource(path, label_properties=["y"], split_fractions=(1.0,))
    except SourceError as exc:  # a file-level problem must name the file
        assert "d.sdf" in str(exc)
        return
    meta = write_split(tmp_path / "train.lmdb", src, split="train", workers=1,
                       progress=False)  # fmt: skip
    assert meta["counts"]["read"] == len(blocks)
    assert meta["counts"]["kept"] + meta["counts"]["skipped"] == len(blocks)
    rows = list(iter_provenance(tmp_path / "train.lmdb"))
    assert [r["source_row"] for r in rows] == list(range(1, len(blocks) + 1))
    assert all(r["reason"] for r in rows if r["status"] == "skipped")


def test_fuzz_xyz_records_written_or_skipped(tmp_path):
    rng = np.random.default_rng(0)
    good = "3\nwater\nO 0.0 0.0 0.117\nH 0.0 0.757 -0.467\nH 0.0 -0.757 -0.467\n"
    recs = []
    for i in range(24):
        lines = good.split("\n")
        kind = i % 6
        if kind == 1:
            lines[0] = ["4", "x", "-1", ""][int(rng.integers(4))]
        elif kind == 2:
            lines[2] = "Qq 0 0 0"
        elif kind == 3:
            lines[3] = "H nan 0 0"
        elif kind == 4:
            lines = lines[: int(rng.integers(1, 4))]
        elif kind == 5:
            lines[4] = "H 0.0 0.0 0.117"  # two atoms on one spot
        recs.append(SourceRecord("train", i, f"x.xyz frame {i + 1}", "xyz", "\n".join(lines),
                                 use_3d=True))  # fmt: skip
    meta = write_split(tmp_path / "train.lmdb", recs, split="train", workers=1, progress=False,
                       remove_hs=False)  # fmt: skip
    c = meta["counts"]
    assert c["read"] == 24 and c["kept"] + c["skipped"] == 24 and c["kept"] >= 4
    with open(skip_list_path(tmp_path / "train.lmdb")) as f:
        skipped = list(csv.reader(f, delimiter="\t"))[1:]
    assert len(skipped) == c["skipped"] and all(r[1] for r in skipped)
    assert all(r[0].startswith("x.xyz frame ") for r in skipped)


# --- fuzz: byte flips of an LMDB are errors naming file and record, never silent changes ----------
def _flip_split(tmp_path):
    recs = [SourceRecord("train", i, f"r{i}", "smiles", s, y=np.array([i + 0.5], np.float32))
            for i, s in enumerate(SMILES)]  # fmt: skip
    path = tmp_path / "train.lmdb"
    write_split(path, recs, split="train", workers=1, progress=False)
    ds = LMDBDataset(path)
    want = [{k: np.array(v) for k, v in ds[i].items()} for i in range(len(ds))]
    want_meta, want_sizes = dict(ds.meta), ds.sizes.copy()
    close_envs()
    return path, want, want_meta, want_sizes


def _value_spans(path, keys):
    """(first byte, length) of each stored value of ``keys`` in the file."""
    import lmdb

    data = path.read_bytes()
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        raws = [bytes(txn.get(key)) for key in keys]
    env.close()
    spans = [(data.find(raw), len(raw)) for raw in raws]
    assert all(start >= 0 for start, _ in spans)
    return spans


def _read_flipped(target, want, want_meta, want_sizes):
    """Read every record of a flipped copy: ``"error"`` (each error names file and record),
    ``"same"`` or ``"silent"`` (a record, the sizes or the meta changed without an error)."""
    close_envs()
    try:
        ds = LMDBDataset(target)
    except Exception as exc:  # noqa: BLE001 - any error type, but it must name the file
        assert str(target) in str(exc), exc
        return "error"
    if ds.meta != want_meta or not np.array_equal(ds.sizes, want_sizes):
        return "silent"
    outcome = "same"
    for i in range(len(want)):
        try:
            rec = ds[i]
        except Exception as exc:  # noqa: BLE001
            assert str(target) in str(exc) and f"record {i}" in str(exc), exc
            outcome = "error"
            continue
        if set(rec) != set(want[i]) or not all(
            rec[k].dtype == want[i][k].dtype
            and np.array_equal(rec[k], want[i][k], equal_nan=True) for k in rec):
            return "silent"
    return outcome


def _flip(data, pos, bit, target):
    flipped = bytearray(data)
    flipped[pos] ^= 1 << bit
    close_envs()
    target.write_bytes(bytes(flipped))
    return target


def test_fuzz_lmdb_byte_flips_errors_name_file_and_record(tmp_path):
    path, want, want_meta, want_sizes = _flip_split(tmp_path)
    data = path.read_bytes()
    rng = np.random.default_rng(1)
    outcomes = []
    for t in range(200):  # anywhere in the file: pages, keys, index, meta, records
        target = _flip(data, int(rng.integers(len(data))), int(rng.integers(8)),
                       tmp_path / f"any{t % 2}.lmdb")  # fmt: skip
        outcomes.append(_read_flipped(target, want, want_meta, want_sizes))
    assert outcomes.count("error") > 0
    close_envs()


def test_unreadable_page_names_file_and_record(tmp_path, monkeypatch):
    import lmdb

    path, *_ = _flip_split(tmp_path)
    ds = LMDBDataset(path)

    class CorruptTxn:
        def get(self, key):
            raise lmdb.CorruptedError("mdb_get: MDB_CORRUPTED: Located page was wrong type")

    monkeypatch.setattr(ds, "_connect", lambda: CorruptTxn())
    with pytest.raises(Exception, match=rf"{path}: record 3 cannot be read \(CorruptedError"):
        ds[3]
    monkeypatch.undo()
    assert set(ds[3]) >= set(K.GRAPH_KEYS)  # the next read opens the file again
    close_envs()


def _silent_flips(tmp_path, keys, trials, seed):
    path, want, want_meta, want_sizes = _flip_split(tmp_path)
    data = path.read_bytes()
    spans = _value_spans(path, keys(len(want)))
    rng = np.random.default_rng(seed)
    silent = []
    for t in range(trials):
        start, size = spans[t % len(spans)]
        pos = start + int(rng.integers(size))
        target = _flip(data, pos, int(rng.integers(8)), tmp_path / f"flip{t % 2}.lmdb")
        if _read_flipped(target, want, want_meta, want_sizes) == "silent":
            silent.append(pos)
    close_envs()
    return silent


def test_fuzz_lmdb_record_byte_flips_never_change_a_record_silently(tmp_path):
    silent = _silent_flips(tmp_path, lambda n: [K.record_key(i) for i in range(n)], 64, 0)
    assert not silent, f"{len(silent)} of 64 bit flips changed a record silently: {silent[:8]}"


def test_fuzz_lmdb_meta_and_index_byte_flips_never_change_silently(tmp_path):
    silent = _silent_flips(tmp_path, lambda n: [K.META_KEY, K.INDEX_KEY], 64, 0)
    assert not silent, f"{len(silent)} of 64 bit flips changed meta/index silently: {silent[:8]}"


def test_readme_delimiter_and_export_commands_run(tmp_path, monkeypatch):
    """The README's TSV and export lines, exactly as documented, on a tiny TSV named mols.txt."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines()]
    tsv = next(ln for ln in lines if ln.startswith("graphormer-ext-preprocess csv --path mols.txt"))
    export = next(ln for ln in lines if ln.startswith("graphormer-ext-preprocess export"))
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "mols.txt", "id\tsmiles\ty1\n" + "".join(
        f"m{i}\t{s}\t{i}\n" for i, s in enumerate(SMILES)))  # fmt: skip
    args = shlex.split(tsv)[1:] + ["--workers", "1", "--no-progress"]
    assert main(args) == 0
    out = args[args.index("--out") + 1]
    export_args = shlex.split(export)[1:]
    export_args[export_args.index("export") + 1] = out
    assert main(export_args) == 0
    written = Path(export_args[export_args.index("--output") + 1]).read_text()
    got = list(csv.DictReader(io.StringIO(written)))
    assert sorted(r["source_id"] for r in got) == sorted(f"m{i}" for i in range(len(SMILES)))
