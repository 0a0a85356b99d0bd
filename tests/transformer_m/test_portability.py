"""The suite runs from any clone: fixtures inside the repository, no machine paths, the
golden fixture checks itself."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from golden_fixture import FIXTURE_DIR, GoldenFixtureError, load_golden
from suite_env import REPO_ROOT

MAX_FIXTURE_BYTES = 1_000_000  # house rule: committed golden files stay under 1 MB
MACHINE_ROOT = "/" + "work" + "/"  # the development machine's root (spelt so as not to match)
SHARED = (".." + "/shared", '"' + 'shared"', "'" + "shared'")  # a sibling folder, a path part


def tracked_files() -> list:
    """Files under version control (or every file, outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                             check=True).stdout  # fmt: skip
        return [REPO_ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "build", ".venv", "runs", "__pycache__"}
        return [p for p in REPO_ROOT.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(REPO_ROOT).parts)]  # fmt: skip


def test_no_machine_paths_in_code_or_tests():
    """No absolute path of the development machine, no reading of a shared folder beside the
    repository."""
    bad = []
    for path in tracked_files():
        if path.suffix not in (".py", ".sh", ".pyx", ".toml", ".cfg", ".txt", ".md", ".json"):
            continue
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        rel = path.relative_to(REPO_ROOT).as_posix()
        if MACHINE_ROOT in text:
            bad.append(f"{rel}: {MACHINE_ROOT!r}")
        if rel.startswith(("tests/", "scripts/")):
            if any(needle in text for needle in SHARED):
                bad.append(f"{rel}: reads a shared folder outside the repository")
    assert not bad, bad


def test_golden_fixture_files_are_small():
    files = sorted(FIXTURE_DIR.iterdir())
    assert {p.name for p in files} >= {
        "README.md", "tm_golden_small_fixedpaths.npz", "tm_golden_small_fixedpaths.json",
        "tm_keys_L12_3d.txt", "tm_keys_L12_3d_removehead.txt", "tm_keys_L12_qm9finetune.txt",
        "tm_keys_param_counts.json",
    }  # fmt: skip
    for path in files:
        assert path.stat().st_size < MAX_FIXTURE_BYTES, path.name


def test_golden_weights_are_checked_against_the_original_hashes(tmp_path):
    for name in ("tm_golden_small_fixedpaths.npz", "tm_golden_small_fixedpaths.json"):
        shutil.copy(FIXTURE_DIR / name, tmp_path / name)
    js = tmp_path / "tm_golden_small_fixedpaths.json"
    g = load_golden(tmp_path / "tm_golden_small_fixedpaths.npz", js)
    assert len(g["state_dict"]) == 70 and sum(v.numel() for v in g["state_dict"].values()) == 442_944
    keys = list(g)  # the original key order: the weights sit just before their note
    assert keys.index("state_dict") + 1 == keys.index("state_dict_note")
    structure = json.loads(js.read_text())
    structure["state_dict"]["draws"][3]["scale"] *= 1.0001  # a recipe that drifted
    js.write_text(json.dumps(structure))
    with pytest.raises(GoldenFixtureError, match="differ from the original"):
        load_golden(tmp_path / "tm_golden_small_fixedpaths.npz", js)


def test_missing_golden_fixture_is_an_error_not_a_skip(tmp_path):
    with pytest.raises(GoldenFixtureError, match="missing"):
        load_golden(tmp_path / "absent.npz", FIXTURE_DIR / "tm_golden_small_fixedpaths.json")
