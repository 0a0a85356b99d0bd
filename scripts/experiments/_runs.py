"""Shared helpers of the reproduction studies in ``scripts/experiments/``.

Each study trains with the ordinary ``fairseq-train`` console script, one save directory per
(condition, seed). fairseq resumes from ``checkpoint_last.pt`` by itself, so a study script
that is interrupted (killed, machine restarted) continues where it stopped when run again with
the same arguments; finished runs are recognised by their ``result.json`` and skipped. A run
directory is locked while a process trains in it, so two invocations (for example one per
core, with different ``--seeds``) never train the same run twice.

Not imported by the packages (``scripts/`` never is).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

logger = logging.getLogger("experiments")

_LOG_LINE = re.compile(r"\| INFO \| ([\w.-]+) \| (\{.*\})\s*$")
EARLY_STOP = "early stop since valid performance hasn't improved"


def setup_logging() -> None:
    """INFO-level console logging for the study CLIs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def repo_commit() -> str:
    """``git rev-parse HEAD`` of this checkout, ``+dirty`` if tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "-uno"],
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def resolve_study_args(args):
    """The fix-ups every study makes to its parsed arguments: the commit it trains with, and
    ``--out`` / ``--report`` as absolute paths (fairseq runs inside the run directory)."""
    args.commit = repo_commit()
    args.out = args.out.resolve()
    args.report = args.report.resolve() if args.report else None
    return args


def child_env(threads: int = 1) -> dict:
    """Environment of the training processes: this checkout first on ``PYTHONPATH`` and a
    fixed thread count (one per run; two runs share a 2-core machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def tool(name: str) -> str:
    """Path of a console script of this environment (``fairseq-train``, ...)."""
    path = BIN / name
    if not path.exists():
        raise SystemExit(f"{path} not found: install the package (bash bootstrap.sh) and run "
                         f"the study with that environment's python")
    return str(path)


class RunLock:
    """``<run_dir>/.lock`` holding the owner's pid; a lock whose process is gone is taken over.

    Raises:
        RuntimeError: another live process holds the lock.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise RuntimeError(f"{self.path.parent} is being trained by pid {pid}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise RuntimeError(f"could not lock {self.path.parent}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_logged(cmd: Sequence, log_path: Path, env: dict, cwd: Path) -> tuple[int, float]:
    """Run ``cmd``, appending its command line and output to ``log_path``.

    Returns:
        (exit status, wall seconds).
    """
    cmd = [str(c) for c in cmd]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd).returncode
    return rc, time.time() - t0


def append_wall(run_dir: Path, step: str, seconds: float, rc: int) -> None:
    """One line per invocation in ``wall.tsv`` (the study's wall time is their sum)."""
    path = Path(run_dir) / "wall.tsv"
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write("step\tstarted\twall_s\trc\n")
        f.write(f"{step}\t{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{seconds:.1f}\t{rc}\n")


def wall_seconds(run_dir: Path, step: str | None = None) -> float:
    """Sum of ``wall.tsv`` (optionally of one step)."""
    path = Path(run_dir) / "wall.tsv"
    if not path.exists():
        return 0.0
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return sum(float(r["wall_s"]) for r in rows if step is None or r["step"] == step)


def log_wall_seconds(log_path: Path, upto_epoch: float = math.inf) -> float:
    """Training wall time in a log that :func:`run_logged` appended to, across resumes.

    fairseq's ``wall`` meter restarts with each process; the log holds one segment per
    invocation (each opened by a ``# <time> $ <command>`` line). The sum of the last ``wall`` of
    every segment also counts invocations that were killed (up to their last logged line).
    ``upto_epoch`` ignores lines of later epochs (the time a budget of that many epochs took).
    """
    total, last = 0.0, 0.0
    if not Path(log_path).exists():
        return total
    with open(log_path, errors="replace") as f:
        for line in f:
            if line.startswith("# ") and " $ " in line:
                total, last = total + last, 0.0
                continue
            m = _LOG_LINE.search(line)
            if not m:
                continue
            try:
                stats = json.loads(m.group(2))
            except json.JSONDecodeError:
                continue
            tag = m.group(1)
            wall = stats.get("wall", stats.get(f"{tag}_wall"))
            if wall is not None and float(stats.get("epoch", 0)) <= upto_epoch:
                last = float(wall)
    return total + last


def fairseq_records(log_path: Path, tags: Iterable[str]) -> list[dict]:
    """JSON stat lines (``--log-format json``) of ``log_path`` whose logger tag is in ``tags``.

    Each record is ``{"tag": tag, **stats}`` with the ``<tag>_`` prefix removed from keys and
    numbers parsed. After a resume fairseq repeats the interrupted epoch: later lines win, so
    callers key records by ``(tag, epoch)`` or ``num_updates``.
    """
    tags = set(tags)
    out = []
    if not Path(log_path).exists():
        return out
    with open(log_path, errors="replace") as f:
        for line in f:
            m = _LOG_LINE.search(line)
            if not m or m.group(1) not in tags:
                continue
            tag = m.group(1)
            try:
                stats = json.loads(m.group(2))
            except json.JSONDecodeError:
                continue
            rec = {"tag": tag}
            for k, v in stats.items():
                key = k[len(tag) + 1:] if k.startswith(tag + "_") else k
                rec[key] = _num(v)
            out.append(rec)
    return out


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def last_by(records: list[dict], key: str) -> dict:
    """``{record[key]: record}`` keeping the last record of each key (resumes repeat lines)."""
    return {r[key]: r for r in records if key in r}


def early_stopped(log_path: Path) -> bool:
    """Whether fairseq stopped the run on its ``--patience`` rule."""
    return Path(log_path).exists() and EARLY_STOP in Path(log_path).read_text(errors="replace")


def write_csv(path: Path, rows: list[dict], fields: Sequence[str]) -> None:
    """Write ``rows`` (missing fields empty) atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in fields})
    tmp.replace(path)


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def read_json(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` atomically (a killed process never leaves half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def check_config(out: Path, config: dict, resumable_keys: Sequence[str]) -> None:
    """Store the study's settings in ``<out>/config.json``, or check them against the stored
    ones: a directory holds one protocol. Keys in ``resumable_keys`` (budgets, seeds) may change
    between invocations; a changed budget continues the runs from their checkpoints.

    Raises:
        SystemExit: a protocol setting differs from the stored one.
    """
    path = Path(out) / "config.json"
    old = read_json(path)
    if old is not None:
        diff = {k: (old.get(k), config.get(k)) for k in set(old) | set(config)
                if k not in resumable_keys and old.get(k) != config.get(k)}
        if diff:
            raise SystemExit(f"{out} holds a study with other settings {diff} (stored, given): "
                             f"use another --out, or the stored settings")
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(path, config)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN std for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
