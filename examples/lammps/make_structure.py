"""LAMMPS data files for the `pair_style janus` examples and benchmarks.

* `from_dataset()` (the default of the command line): a multi-element crystal from the
  dft-89 DFT data shipped in examples/data/, repeated to at least `--min-length` Angstrom
  per cell vector. Its elements, in type order, are written to `ELEMENTS_FILE` beside the
  data file for the `pair_coeff` line (`-var elements "..."` of in.nve / in.npt).
* `alloy()`: a rattled fcc Cu/Ni/Al/Si supercell of any size, for the benchmarks.

    python examples/lammps/make_structure.py -o runs/demo/lammps/structure.data
    python examples/lammps/make_structure.py --alloy --repeat 8 -o big.data
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.io import read, write

ALLOY_ELEMENTS = ("Cu", "Ni", "Al", "Si")
DATASET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "mptrj-random-1k.xyz")


def alloy(repeat: int = 4, seed: int = 0, rattle: float = 0.05, lattice_constant: float = 3.7) -> Atoms:
    """fcc supercell (4 * repeat**3 atoms) with random Cu/Ni/Al/Si occupation and rattled positions."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=lattice_constant, cubic=True).repeat((repeat, repeat, repeat))
    atoms.set_chemical_symbols(rng.choice(ALLOY_ELEMENTS, size=len(atoms), p=(0.4, 0.3, 0.2, 0.1)))
    atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
    atoms.wrap()
    return atoms


def from_dataset(path: str = DATASET, min_length: float = 10.0, min_elements: int = 3) -> Atoms:
    """The first structure of `path` with >= `min_elements` elements and 8..30 atoms, repeated
    to at least `min_length` Angstrom along each cell vector."""
    for atoms in read(path, ":"):
        if len(set(atoms.get_chemical_symbols())) >= min_elements and 8 <= len(atoms) <= 30:
            reps = [max(1, int(np.ceil(min_length / length))) for length in atoms.cell.lengths()]
            crystal = atoms.repeat(reps)
            crystal.calc = None
            return crystal
    raise ValueError(f"{path} has no structure with {min_elements} or more elements and 8..30 atoms")


def element_order(atoms: Atoms) -> list[str]:
    return sorted(set(atoms.get_chemical_symbols()), key=atoms.get_chemical_symbols().index)


def write_data(atoms: Atoms, path: str, elements: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """LAMMPS data file (atom_style atomic, units metal); returns the elements in type order."""
    elements = list(elements or element_order(atoms))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write(path, atoms, format="lammps-data", specorder=elements, masses=True, units="metal", atom_style="atomic")
    return elements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alloy", action="store_true", help="write the synthetic fcc alloy instead")
    parser.add_argument("--repeat", type=int, default=4, help="alloy: fcc cells per direction (4 * repeat**3 atoms)")
    parser.add_argument("--min-length", type=float, default=10.0, help="dataset: minimum cell vector length")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    atoms = alloy(args.repeat) if args.alloy else from_dataset(min_length=args.min_length)
    elements = write_data(atoms, args.output, ALLOY_ELEMENTS if args.alloy else None)
    print(f"wrote {atoms.get_chemical_formula()} ({len(atoms)} atoms; types 1..{len(elements)} = "
          f"{' '.join(elements)}) to {args.output}")


if __name__ == "__main__":
    main()
