"""Write a LAMMPS data file from ASE, and the `pair_coeff` line that matches its atom types.

LAMMPS knows atom types 1, 2, …, not elements. `ase.io.write(…, format="lammps-data",
specorder=[…])` numbers the types in the order of `specorder` (type k = k-th element),
`masses=True` writes the matching Masses section, and `pair_coeff * * model.pt El1 El2 …`
must list the elements in that same order. Another order is not an error: it silently
swaps the elements, and LAMMPS computes another material.

    python examples/ase/lammps_data.py --model model.pt --formula MgO --lattice rocksalt -a 4.21 \\
        --specorder O Mg -o structure.data
    lmp -in in.lammps          # the printed input (needs the exported file, not a checkpoint)

Without `--specorder` the types follow the elements' first appearance in the structure.
"""

from __future__ import annotations

import argparse
import sys

from ase.io import write

from janus_potential.io import is_torchscript_file

from common import add_crystal_arguments, add_model_argument, build_crystal, model_elements

INPUT = """units        metal
atom_style   atomic
newton       on
read_data    {data}
pair_style   janus
pair_coeff   * * {model} {elements}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_crystal_arguments(parser, "MgO", "rocksalt", 4.21, repeat=2, rattle=0.0)
    parser.add_argument("--specorder", nargs="+", help="elements in LAMMPS type order (type 1 first)")
    parser.add_argument("-o", "--output", default="structure.data", help="data file (default: structure.data)")
    args = parser.parse_args()

    atoms = build_crystal(args)
    symbols = atoms.get_chemical_symbols()
    specorder = args.specorder or sorted(set(symbols), key=symbols.index)
    if sorted(specorder) != sorted(set(symbols)):
        parser.error(f"--specorder {' '.join(specorder)} must list each element of {atoms.get_chemical_formula()} once")
    covered, _ = model_elements(args.model)
    missing = [symbol for symbol in specorder if symbol not in covered]
    if missing:
        print(f"error: {args.model} does not cover {' '.join(missing)}", file=sys.stderr)
        return 2

    write(args.output, atoms, format="lammps-data", specorder=specorder, masses=True,
          units="metal", atom_style="atomic")
    types = ", ".join(f"{k} = {symbol}" for k, symbol in enumerate(specorder, start=1))
    print(f"wrote {args.output}: {atoms.get_chemical_formula()}, {len(atoms)} atoms, types {types}")
    model = args.model
    if not is_torchscript_file(model):
        print(f"note: LAMMPS reads exported files only: janus export {model} -o model.pt")
        model = "model.pt"
    print("LAMMPS input:")
    print(INPUT.format(data=args.output, model=model, elements=" ".join(specorder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
