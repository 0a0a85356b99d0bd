#!/usr/bin/env python
"""Generate an MD17-format trajectory offline with GFN2-xTB (tblite) + ASE Langevin MD.

Pipeline: SMILES -> RDKit (explicit H, ETKDG seeded, MMFF94 minimisation) -> ASE
``Langevin`` (0.5 fs, 500 K, friction 0.01/fs, seeded Maxwell-Boltzmann start, centre of
mass fixed) with the ``tblite.ase.TBLite(method="GFN2-xTB")`` calculator. After ``--equilibrate`` discarded
steps, every ``--stride``-th step is recorded.

Output: an npz with the exact sGDML/MD17 keys and units::

    z      int64   [N]         atomic numbers
    R      float64 [M, N, 3]   positions, Å
    E      float64 [M, 1]      total energy, kcal/mol
    F      float64 [M, N, 3]   forces, kcal/mol/Å (= -dE/dR)
    name, theory, r_unit ("Ang"), e_unit ("kcal/mol"), smiles, seed   strings / ints

The labels are **semi-empirical GFN2-xTB**, not the DFT (PBE+vdW-TS) of MD17 nor the
CCSD(T) of MD17-CCSD(T): use the file for pipeline tests and demos, not for comparison
with published MD17 numbers. With ``--fd-check K`` the analytic forces of K frames are
compared with central finite differences of the energy (logged).

Set ``OMP_NUM_THREADS=1`` (done below if unset): OpenMP spin-waiting makes tblite ~50x
slower on a busy 2-core machine.

Usage::

    .venv/bin/python scripts/make_md17_xtb.py --smiles CCO --name ethanol \\
        --frames 1500 --seed 0 --out data/md17-xtb/md17_ethanol_xtb.npz --fd-check 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

logger = logging.getLogger("make_md17_xtb")


def embed(smiles: str, seed: int):
    """RDKit molecule with explicit H and one ETKDG + MMFF94 conformer."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(mol, params) != 0:
            raise RuntimeError(f"ETKDG failed for {smiles!r}")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    return mol


def make_atoms(mol):
    from ase import Atoms

    z = [a.GetAtomicNum() for a in mol.GetAtoms()]
    pos = mol.GetConformer().GetPositions()
    return Atoms(numbers=z, positions=pos)


def calculator():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def fd_check(atoms, forces_ev: np.ndarray, h: float = 1e-3, n_coords: int = 6,
             rng: np.random.Generator | None = None) -> float:  # fmt: skip
    """Max |F_analytic - F_fd| in eV/Å over ``n_coords`` random coordinates."""
    rng = rng or np.random.default_rng(0)
    a = atoms.copy()
    a.calc = calculator()
    worst = 0.0
    flat = rng.choice(len(a) * 3, size=min(n_coords, len(a) * 3), replace=False)
    for k in flat.tolist():
        i, c = divmod(k, 3)
        p = a.get_positions()
        p[i, c] += h
        a.set_positions(p)
        e_plus = a.get_potential_energy()
        p[i, c] -= 2 * h
        a.set_positions(p)
        e_minus = a.get_potential_energy()
        p[i, c] += h
        a.set_positions(p)
        fd = -(e_plus - e_minus) / (2 * h)
        worst = max(worst, abs(fd - forces_ev[i, c]))
    return worst


def run(args: argparse.Namespace) -> Path:
    from ase import units
    from ase.md.langevin import Langevin
    from ase.constraints import FixCom
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite")
    kcal_per_ev = 1.0 / (units.kcal / units.mol)  # 23.0605...
    mol = embed(args.smiles, args.seed)
    atoms = make_atoms(mol)
    atoms.calc = calculator()
    rng = np.random.default_rng(args.seed)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=rng)
    Stationary(atoms)
    # fixed centre of mass the way ASE >= 3.28 recommends (fixcm=True is deprecated)
    atoms.set_constraint(FixCom())
    dyn = Langevin(
        atoms,
        args.timestep * units.fs,
        temperature_K=args.temperature,
        friction=args.friction / units.fs,
        fixcm=False,
        rng=np.random.RandomState(args.seed),
    )
    n = len(atoms)
    R = np.empty((args.frames, n, 3))
    E = np.empty((args.frames, 1))
    F = np.empty((args.frames, n, 3))
    t0 = time.time()
    dyn.run(args.equilibrate)
    for m in range(args.frames):
        dyn.run(args.stride)
        R[m] = atoms.get_positions()
        E[m, 0] = atoms.get_potential_energy() * kcal_per_ev
        # raw -dE/dR; FixCom would project out the net force
        F[m] = atoms.get_forces(apply_constraint=False) * kcal_per_ev
    logger.info("%d frames of %d atoms in %.1f s", args.frames, n, time.time() - t0)
    if args.fd_check:
        check_rng = np.random.default_rng(args.seed + 1)
        for m in check_rng.choice(args.frames, size=args.fd_check, replace=False):
            probe = atoms.copy()
            probe.set_constraint()
            probe.set_positions(R[m])
            err = fd_check(probe, F[m] / kcal_per_ev, rng=check_rng)
            logger.info(
                "finite-difference check frame %d: max |F - F_fd| = %.2e eV/Å "
                "(%.2e kcal/mol/Å)", m, err, err * kcal_per_ev,
            )  # fmt: skip
            if err > args.fd_tol:
                raise RuntimeError(
                    f"frame {m}: forces disagree with finite differences by {err:.2e} "
                    f"eV/Å > --fd-tol {args.fd_tol:g}"
                )
    from importlib.metadata import version

    tblite_version = version("tblite")

    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        z=atoms.get_atomic_numbers().astype(np.int64),
        R=R,
        E=E,
        F=F,
        name=np.array(args.name),
        theory=np.array(
            f"GFN2-xTB (tblite {tblite_version}), Langevin {args.temperature:g} K, "
            f"{args.timestep:g} fs; semi-empirical, not DFT/CCSD(T)"
        ),
        r_unit=np.array("Ang"),
        e_unit=np.array("kcal/mol"),
        smiles=np.array(args.smiles),
        seed=np.array(args.seed),
    )
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    logger.info(
        "wrote %s (%d bytes, sha256 %s); E span %.2f kcal/mol, |F| max %.1f kcal/mol/Å",
        out, out.stat().st_size, digest, np.ptp(E), np.abs(F).max(),
    )  # fmt: skip
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smiles", default="CCO", help="molecule (default ethanol, CCO)")
    p.add_argument("--name", default="ethanol", help="npz 'name' field")
    p.add_argument("--frames", type=int, default=1500, help="recorded frames")
    p.add_argument("--stride", type=int, default=1, help="MD steps per recorded frame")
    p.add_argument("--equilibrate", type=int, default=200, help="discarded MD steps")
    p.add_argument("--temperature", type=float, default=500.0, help="K")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin, 1/fs")
    p.add_argument("--seed", type=int, default=0, help="ETKDG, velocities and noise")
    p.add_argument("--fd-check", type=int, default=0, help="frames to FD-check")
    p.add_argument(
        "--fd-tol", type=float, default=1e-3, help="max FD force error, eV/Å"
    )
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
