"""`make demo`: train the default preset for a few minutes on real DFT data, evaluate it,
export it and run molecular dynamics with it in ASE and in LAMMPS (1 and 2 MPI ranks).

Everything is written under runs/demo/: train/ (checkpoint, metrics.jsonl), metrics.json
(validation errors by source), model.pt (the exported float32 model), md.log (ASE MD) and
the LAMMPS logs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.md.langevin import Langevin

from janus_potential.ase import JanusCalculator
from janus_potential.export import export_model
from janus_potential.training.config import TrainConfig
from janus_potential.training.evaluate import format_table
from janus_potential.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "runs" / "demo"
TRAINING_DATA = ROOT / "examples" / "data" / "mpf-alkali-TP.xyz"  # examples/demo.yaml's training file
sys.path.insert(0, str(ROOT / "examples" / "lammps"))


def train(minutes: float) -> Trainer:
    config = TrainConfig.load(ROOT / "examples" / "demo.yaml", [f"run.max_minutes={minutes}"])
    os.chdir(ROOT)
    shutil.rmtree(config.run.output, ignore_errors=True)
    trainer = Trainer(config)
    report = trainer.model.parameter_report()
    print(f"training preset {config.model.preset} ({report['total_parameters']:,} parameters, "
          f"{report['active_parameters_per_atom']:,} active per atom) for {minutes} min on "
          f"{len(trainer.train_samples)} structures; validating on {len(trainer.validation_samples)}")
    summary = trainer.fit()
    print(format_table(summary))
    print("(F=0 MAE: the force error of predicting zero forces on the same frames, the baseline to beat)")
    (OUTPUT / "metrics.json").write_text(json.dumps({"steps": trainer.step, "validation": summary}, indent=1))
    return trainer


def md_structure() -> Atoms:
    """A multi-element crystal of the training data, repeated to at least 10 A along each cell vector."""
    from make_structure import from_dataset

    return from_dataset(str(TRAINING_DATA))


def run_ase_md(model_path: Path, steps: int) -> Path:
    atoms = md_structure()
    atoms.calc = JanusCalculator(str(model_path))
    rng = np.random.default_rng(0)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * 300))
    log = OUTPUT / "md.log"
    dynamics = Langevin(atoms, 1.0 * units.fs, temperature_K=300, friction=0.01, logfile=str(log), loginterval=10,
                        fixcm=False, rng=rng)
    start = time.perf_counter()
    dynamics.run(steps)
    elapsed = time.perf_counter() - start
    print(f"ASE MD ({atoms.get_chemical_formula()}, {len(atoms)} atoms): {steps} steps, "
          f"{steps * len(atoms) / elapsed:,.0f} atom-steps/s; log {log}")
    return log


def run_lammps(model_path: Path) -> None:
    script = ROOT / "examples" / "lammps" / "run_examples.py"
    if not script.exists():
        print("LAMMPS examples are not available in this checkout")
        return
    subprocess.run([sys.executable, str(script), "--model", str(model_path), "--output", str(OUTPUT / "lammps"),
                    "--data", str(TRAINING_DATA)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="training time (default 3)")
    parser.add_argument("--md-steps", type=int, default=200)
    parser.add_argument("--skip-lammps", action="store_true")
    args = parser.parse_args()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    trainer = train(args.minutes)
    model_path = OUTPUT / "model.pt"
    export_model(trainer.ema_model(), model_path, dtype="float32")
    print(f"exported {model_path}")
    run_ase_md(model_path, args.md_steps)
    if not args.skip_lammps:
        run_lammps(model_path)
    print(f"demo outputs are in {OUTPUT}")


if __name__ == "__main__":
    main()
