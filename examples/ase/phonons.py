"""Phonons with phonopy: force constants from finite displacements, frequencies at Gamma.

phonopy is an optional extra: `pip install "janus-potential[phonons]"` (or `pip install phonopy`).

1. the primitive cell, built in ASE, handed to phonopy as `PhonopyAtoms`;
2. `Phonopy(unitcell, supercell_matrix)` builds the supercell and the displacements that
   the crystal's symmetry leaves independent (`--displacement`, A);
3. `JanusCalculator` gives the forces on each displaced supercell;
4. `produce_force_constants()`; frequencies at Gamma in THz (imaginary ones printed negative).

At Gamma three frequencies are zero: a rigid translation of the crystal costs no energy.
Relax the cell first (relax.py) for physical phonons; `--save phonopy_params.yaml` keeps the
structure and force constants for phonopy's own tools (band structure, DOS, thermal
properties: `phonopy.load("phonopy_params.yaml")`).

    python examples/ase/phonons.py --model model.pt --formula Si --lattice diamond -a 5.43
    python examples/ase/phonons.py --model model.pt --formula MgO --lattice rocksalt -a 4.21 --supercell 2
"""

from __future__ import annotations

import argparse

import numpy as np
from ase import Atoms
from phonopy import Phonopy
from phonopy.structure.atoms import PhonopyAtoms

from janus_potential.ase import JanusCalculator

from common import add_crystal_arguments, add_model_argument, build_crystal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_crystal_arguments(parser, "Si", "diamond", 5.43, repeat=None)
    parser.add_argument("--supercell", type=int, default=3,
                        help="supercell: N x N x N primitive cells (default: 3)")
    parser.add_argument("--displacement", type=float, default=0.01, help="displacement in A (default: 0.01)")
    parser.add_argument("--save", help="write phonopy's parameter file with the force constants here")
    args = parser.parse_args()

    primitive = build_crystal(args, cubic=False)
    unitcell = PhonopyAtoms(symbols=primitive.get_chemical_symbols(), cell=primitive.get_cell()[:],
                            scaled_positions=primitive.get_scaled_positions())
    phonon = Phonopy(unitcell, supercell_matrix=np.eye(3, dtype=int) * args.supercell, primitive_matrix="P")
    phonon.generate_displacements(distance=args.displacement)
    calculator = JanusCalculator(args.model)
    forces = []
    for supercell in phonon.supercells_with_displacements:
        atoms = Atoms(supercell.symbols, cell=supercell.cell, scaled_positions=supercell.scaled_positions, pbc=True)
        atoms.calc = calculator
        forces.append(atoms.get_forces())
    phonon.forces = np.array(forces)
    phonon.produce_force_constants()
    print(f"{primitive.get_chemical_formula()}: supercell {args.supercell}x{args.supercell}x{args.supercell} "
          f"({len(phonon.supercell)} atoms), {len(forces)} displaced supercells")
    phonon.run_qpoints([[0.0, 0.0, 0.0]])
    print("frequencies at Gamma (THz): " + " ".join(f"{f:.6f}" for f in phonon.qpoints.frequencies[0]))
    if args.save:
        phonon.save(args.save, settings={"force_constants": True})


if __name__ == "__main__":
    main()
