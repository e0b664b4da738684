"""The ASE stress convention, shown on a crystal.

- `atoms.get_stress()` returns 6 numbers in Voigt order xx, yy, zz, yz, xz, xy, in eV/A^3;
  `atoms.get_stress(voigt=False)` the symmetric 3x3 tensor (`ase.stress` converts between
  the two: `voigt_6_to_full_3x3_stress`, `full_3x3_to_voigt_6_stress`).
- The stress is the derivative of the energy with respect to strain per volume,
  sigma_ij = (1/V) dE/d(epsilon_ij). Positive is tensile: the crystal pulls inwards and
  would shrink if the cell were free. A compressed crystal has negative diagonal
  components; the pressure is p = -trace(sigma)/3 and is positive under compression.
- In GPa: `stress / ase.units.GPa` (1 eV/A^3 = 160.2 GPa).
- LAMMPS reports the pressure tensor instead: -sigma, in bar (`units metal`), in the order
  xx yy zz xy xz yz.

    python examples/ase/stress.py --model model.pt --formula Cu --lattice fcc -a 3.4
    python examples/ase/stress.py --model model.pt --rattle 0.05 --repeat 2   # shear components too
"""

from __future__ import annotations

import argparse

import numpy as np
from ase import Atoms, units

from janus_potential.ase import JanusCalculator

from common import add_crystal_arguments, add_model_argument, build_crystal

LAMMPS_ORDER = [0, 1, 2, 5, 4, 3]  # ASE Voigt (xx yy zz yz xz xy) -> LAMMPS (xx yy zz xy xz yz)


def strain_derivative(atoms: Atoms, i: int, j: int, step: float = 1e-5) -> float:
    """(1/V) dE/d(epsilon_ij) by central differences: strain the cell, atoms move along."""
    energies = []
    for sign in (1, -1):
        strain = np.eye(3)
        strain[i, j] += sign * step
        strained = atoms.copy()
        strained.calc = atoms.calc
        strained.set_cell(atoms.get_cell() @ strain, scale_atoms=True)
        energies.append(strained.get_potential_energy())
    return (energies[0] - energies[1]) / (2 * step) / atoms.get_volume()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_crystal_arguments(parser, "Cu", "fcc", 3.6, repeat=1, rattle=0.0)
    args = parser.parse_args()

    atoms = build_crystal(args)
    atoms.calc = JanusCalculator(args.model)
    stress = atoms.get_stress()
    pressure = -stress[:3].sum() / 3
    print(f"{atoms.get_chemical_formula()}: {len(atoms)} atoms, volume {atoms.get_volume():.6f} A^3")
    print("stress (eV/A^3, xx yy zz yz xz xy): " + " ".join(f"{s:.10e}" for s in stress))
    print("stress (GPa, xx yy zz yz xz xy): " + " ".join(f"{s:.8f}" for s in stress / units.GPa))
    print("stress (eV/A^3, 3x3):")
    for row in atoms.get_stress(voigt=False):
        print("    " + " ".join(f"{s:17.10e}" for s in row))
    print(f"pressure (GPa) = -trace/3: {pressure / units.GPa:.8f}")
    print(f"{'compressed' if pressure > 0 else 'stretched'}: "
          f"the crystal would {'expand' if pressure > 0 else 'shrink'} if its cell were free")
    print(f"(1/V) dE/d(epsilon_xx), finite differences (eV/A^3): {strain_derivative(atoms, 0, 0):.10e}"
          f"  (= stress xx)")
    print("LAMMPS pressure (bar, pxx pyy pzz pxy pxz pyz): "
          + " ".join(f"{p:.6f}" for p in -stress[LAMMPS_ORDER] / units.bar))


if __name__ == "__main__":
    main()
