"""Which elements a Janus model covers.

    python examples/ase/elements.py --model model.pt            # the model's element list
    python examples/ase/elements.py --model model.pt Cu O Og    # and whether each one is covered

The list is part of the exported file's metadata. `janus info model.pt` prints all of the
metadata as JSON (cutoff, layers, width, dtype, parameters, provenance, "elements"); from
Python:

    from janus_potential.export import read_metadata
    read_metadata("model.pt")["elements"]        # ["H", "He", …], in atomic-number order

A trained model covers the elements of its training data. `JanusCalculator` refuses a
structure with any other element, and so does `pair_coeff` in LAMMPS.
"""

from __future__ import annotations

import argparse

from common import add_model_argument, model_elements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("symbols", nargs="*", help="element symbols to look up")
    args = parser.parse_args()
    elements, cutoff = model_elements(args.model)
    print(f"{args.model}: {len(elements)} elements, cutoff {cutoff} A")
    print(f"elements: {' '.join(elements)}")
    for symbol in args.symbols:
        print(f"{symbol}: {'covered' if symbol in elements else 'not covered'}")


if __name__ == "__main__":
    main()
