"""Run the LAMMPS examples (in.nve, in.npt) with a Janus model on 1 and 2 MPI ranks.

    python examples/lammps/run_examples.py --model runs/demo/model.pt --output runs/demo/lammps

The structure is a multi-element crystal from the shipped dft-89 data (make_structure.py).
Each run's LAMMPS log goes to OUTPUT/log.<input>.<ranks>; the last thermo line is printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

sys.path.insert(0, str(HERE))
from make_structure import DATASET, from_dataset, write_data  # noqa: E402


def last_thermo(log: Path) -> str:
    """The thermo header and the last thermo line of a LAMMPS log."""
    lines = log.read_text().splitlines()
    end = next((k for k, line in enumerate(lines) if line.startswith("Loop time")), None)
    if end is None:
        return "(no thermo output)"
    header = next(line for line in reversed(lines[:end]) if line.split() and line.split()[0] == "Step")
    return f"{header.strip()}\n    {lines[end - 1].strip()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--data", default=DATASET, help="structures to pick the crystal from (default: %(default)s)")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    atoms = from_dataset(args.data)
    data = args.output / "structure.data"
    elements = write_data(atoms, str(data))
    print(f"LAMMPS: {atoms.get_chemical_formula()} ({len(atoms)} atoms), pair_coeff * * model.pt {' '.join(elements)}")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    for script, ranks in [("in.nve", 1), ("in.nve", 2), ("in.npt", 2)]:
        log = args.output / f"log.{script.removeprefix('in.')}.{ranks}"
        command = [str(BIN / "lmp"), "-in", str(HERE / script), "-log", str(log), "-screen", "none",
                   "-var", "model", str(args.model.resolve()), "-var", "data", str(data.resolve()),
                   "-var", "elements", " ".join(elements), "-var", "steps", str(args.steps)]
        if ranks > 1:
            command = [str(BIN / "mpirun"), "-np", str(ranks), *command]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=args.output, env=env)
        seconds = time.perf_counter() - start
        print(f"  {script} on {ranks} rank(s): {args.steps} steps in {seconds:.1f} s; log {log}")
        print(f"    {last_thermo(log)}")


if __name__ == "__main__":
    main()
