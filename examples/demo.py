"""The `make demo` script: a Janus model from the default preset, exported and run in MD.

Writes everything under runs/demo/: the exported `model.pt` and the MD log `md.log`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from janus_potential import JanusPotential
from janus_potential.ase import JanusCalculator
from janus_potential.export import export_model

ROOT = Path(__file__).resolve().parent.parent


def run_ase_md(model_path: Path, log_path: Path, steps: int) -> None:
    atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat((4, 4, 4))
    atoms.calc = JanusCalculator(str(model_path))
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = Langevin(atoms, 1.0 * units.fs, temperature_K=300, friction=0.01, logfile=str(log_path),
                        loginterval=10)
    start = time.perf_counter()
    dynamics.run(steps)
    elapsed = time.perf_counter() - start
    print(f"ASE MD: {len(atoms)} atoms, {steps} steps, {steps * len(atoms) / elapsed:,.0f} atom-steps/s; log {log_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--md-steps", type=int, default=200)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "demo")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = JanusPotential.from_preset(args.preset)
    report = model.parameter_report()
    print(f"model: preset {args.preset}, {report['total_parameters']:,} parameters, "
          f"{report['active_parameters_per_atom']:,} active per atom")
    model_path = args.output / "model.pt"
    export_model(model, model_path)
    print(f"exported {model_path}")
    run_ase_md(model_path, args.output / "md.log", args.md_steps)


if __name__ == "__main__":
    main()
