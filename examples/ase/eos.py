"""Equation of state: energy against volume, fitted with `ase.eos.EquationOfState`.

The cell is scaled isotropically from (1 - range) to (1 + range) times its volume, with the
atoms moving along (fractional coordinates fixed: right for fcc, bcc, diamond, rocksalt;
relax internal coordinates first where symmetry leaves them free). The fit gives the
equilibrium volume V0, the energy E0 there and the bulk modulus B = V d²E/dV² at V0,
converted to GPa with `ase.units.GPa`.

    python examples/ase/eos.py --model model.pt --formula Cu --lattice fcc -a 3.6
    python examples/ase/eos.py --model model.pt --formula Si --lattice diamond -a 5.43 --plot eos.png
"""

from __future__ import annotations

import argparse

import numpy as np
from ase import units
from ase.eos import EquationOfState

from janus_potential.ase import JanusCalculator

from common import add_crystal_arguments, add_model_argument, build_crystal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_crystal_arguments(parser, "Cu", "fcc", 3.6, repeat=1)
    parser.add_argument("--range", type=float, default=0.1, help="relative volume range, +- (default: 0.1)")
    parser.add_argument("--points", type=int, default=11, help="number of volumes (default: 11)")
    parser.add_argument("--eos", default="birchmurnaghan",
                        help="equation of state: birchmurnaghan, murnaghan, vinet, sj, … (default: birchmurnaghan)")
    parser.add_argument("--plot", help="save the fit as an image (e.g. eos.png)")
    args = parser.parse_args()

    atoms = build_crystal(args)
    atoms.calc = JanusCalculator(args.model)
    cell = atoms.get_cell()
    volumes, energies = [], []
    print("volume (A^3)   energy (eV)")
    for factor in np.linspace(1 - args.range, 1 + args.range, args.points):
        atoms.set_cell(cell * factor ** (1 / 3), scale_atoms=True)
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
        print(f"{volumes[-1]:12.6f}   {energies[-1]:.10f}")

    eos = EquationOfState(volumes, energies, eos=args.eos)
    v0, e0, bulk_modulus = eos.fit()
    print(f"V0 (A^3): {v0:.8f}")
    print(f"E0 (eV): {e0:.10f}")
    print(f"B (GPa): {bulk_modulus / units.GPa:.6f}")
    print(f"a0 (A): {args.a * (v0 / cell.volume) ** (1 / 3):.6f}  (the lattice constant at V0)")
    if args.plot:
        eos.plot(args.plot)


if __name__ == "__main__":
    main()
