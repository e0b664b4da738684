"""Relax atom positions and the cell together: `FrechetCellFilter` with FIRE or BFGS.

`ase.filters.FrechetCellFilter(atoms)` hands the optimizer the cell (as a logarithmic
deformation) next to the atom positions, so one optimizer run brings both the forces and
the stress to zero. Its generalised "forces" on the cell are the virial per atom, i.e.
stress × volume / number of atoms (eV), so `fmax` bounds every force (eV/A) and every
stress component times the volume per atom.

    python examples/ase/relax.py --model model.pt --formula Cu --lattice fcc -a 3.7 --rattle 0.05
    python examples/ase/relax.py --model model.pt --optimizer BFGS --fmax 0.001 -o relaxed.extxyz

The exit status is 1 when the run ends without reaching `fmax` within `--steps`.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from ase import Atoms, units
from ase.filters import FrechetCellFilter
from ase.io import write
from ase.optimize import BFGS, FIRE

from janus_potential.ase import JanusCalculator

from common import add_crystal_arguments, add_model_argument, build_crystal

OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS}


def report(label: str, atoms: Atoms) -> None:
    """Energy, largest force, stress (GPa) and volume per atom of `atoms`."""
    force = np.linalg.norm(atoms.get_forces(), axis=1).max()
    stress = " ".join(f"{s:.6f}" for s in atoms.get_stress() / units.GPa)
    print(f"{label} energy (eV): {atoms.get_potential_energy():.10f}")
    print(f"{label} max force (eV/A): {force:.3e}")
    print(f"{label} stress (GPa, xx yy zz yz xz xy): {stress}")
    print(f"{label} volume per atom (A^3): {atoms.get_volume() / len(atoms):.6f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_crystal_arguments(parser, "Cu", "fcc", 3.7, repeat=2, rattle=0.05)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="FIRE")
    parser.add_argument("--fmax", type=float, default=0.01, help="convergence criterion in eV/A (default: 0.01)")
    parser.add_argument("--steps", type=int, default=500, help="most optimizer steps (default: 500)")
    parser.add_argument("-o", "--output", help="write the relaxed structure here (any ASE format, e.g. .extxyz)")
    args = parser.parse_args()

    atoms = build_crystal(args)
    atoms.calc = JanusCalculator(args.model)
    report("initial", atoms)
    optimizer = OPTIMIZERS[args.optimizer](FrechetCellFilter(atoms), logfile=None)
    converged = optimizer.run(fmax=args.fmax, steps=args.steps)
    report("final", atoms)
    print(f"{'converged' if converged else 'NOT converged'} after {optimizer.nsteps} steps (fmax {args.fmax} eV/A)")
    if args.output:
        write(args.output, atoms)
    return 0 if converged else 1


if __name__ == "__main__":
    sys.exit(main())
