"""MACE from scratch on the accuracy study's data and split (issue 14's anchor).

    python bench/mace_anchor.py --mace-venv ../mace-venv [--epochs 6] [--output runs/mace-anchor]

MACE is not a dependency of Janus: it runs from its own virtual environment, made once with
    python3.11 -m venv ../mace-venv && ../mace-venv/bin/pip install torch==2.13.0 mace-torch==0.3.16
This script (in the project's environment) writes the training and validation frames of
`examples/accuracy.yaml` -- the same files and the same split as `janus train` (training's
`split_indices` over the frames of the six files in order, `data.split_seed`,
`data.validation_fraction`) -- as extended XYZ, trains MACE on one thread
(`OMP_NUM_THREADS=1`; 32x0e+32x1o, L=1, two interactions, r_max 5 A, float32, EMA), evaluates
the final model on the validation frames with `mace_eval_configs`, and writes the per-file
MAEs (energy per atom, forces, and the zero-force baseline on the same frames) to
bench/results/mace_anchor.json, with the wall time of the training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import ase.io
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "accuracy.yaml"


def split_frames(output: Path) -> tuple[Path, Path]:
    from janus_potential.training.data import split_indices

    config = yaml.safe_load(CONFIG.read_text())
    data = config["data"]
    frames = []
    for path in data["train"]:
        for atoms in ase.io.read(CONFIG.parent / path, ":"):
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
            stress = atoms.get_stress(voigt=False)
            atoms.calc = None
            atoms.info.update(REF_energy=energy, REF_stress=stress.reshape(-1), file=Path(path).stem)
            atoms.arrays["REF_forces"] = forces
            frames.append(atoms)
    train, validation = split_indices(len(frames), data.get("validation_fraction", 0.1), data.get("split_seed", 0))
    output.mkdir(parents=True, exist_ok=True)
    paths = output / "train.xyz", output / "valid.xyz"
    for path, indices in zip(paths, (train, validation)):
        ase.io.write(path, [frames[k] for k in indices], format="extxyz")
    print(f"{len(train)} training and {len(validation)} validation frames")
    return paths


def per_file_errors(valid: Path, predicted: Path) -> dict:
    reference = ase.io.read(valid, ":")
    prediction = ase.io.read(predicted, ":")
    sums: dict = {}
    for ref, pred in zip(reference, prediction):
        n = len(ref)
        e_err = abs(pred.info["MACE_energy"] - ref.info["REF_energy"]) / n
        f_err = np.abs(pred.arrays["MACE_forces"] - ref.arrays["REF_forces"]).reshape(-1)
        f_zero = np.abs(ref.arrays["REF_forces"]).reshape(-1)
        for key in (ref.info["file"], "all"):
            entry = sums.setdefault(key, {"e": [], "f": [], "f0": []})
            entry["e"].append(e_err)
            entry["f"].extend(f_err)
            entry["f0"].extend(f_zero)
    return {key: {"energy_per_atom_mae_mev": 1000 * float(np.mean(v["e"])), "forces_mae": float(np.mean(v["f"])),
                  "forces_zero_mae": float(np.mean(v["f0"])), "frames": len(v["e"])} for key, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mace-venv", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "mace-anchor")
    args = parser.parse_args()
    train, valid = args.output / "train.xyz", args.output / "valid.xyz"
    if not (train.exists() and valid.exists()):
        train, valid = split_frames(args.output)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1")
    bin_dir = args.mace_venv.resolve() / "bin"
    name = "mace-anchor"
    command = [
        str(bin_dir / "mace_run_train"), f"--name={name}", f"--train_file={train}", f"--valid_file={valid}",
        "--E0s=average", "--model=MACE", "--hidden_irreps=32x0e+32x1o", "--max_L=1", "--num_interactions=2",
        "--r_max=5.0", f"--batch_size={args.batch_size}", f"--max_num_epochs={args.epochs}", "--device=cpu",
        "--default_dtype=float32", "--energy_key=REF_energy", "--forces_key=REF_forces", "--stress_key=REF_stress",
        "--ema", "--ema_decay=0.99", "--amsgrad", "--error_table=PerAtomMAE", "--num_workers=0", "--seed=0",
        "--eval_interval=1", "--restart_latest",
    ]
    model = args.output / f"{name}.model"
    timing = args.output / "train_minutes.json"
    if not (model.exists() and timing.exists()):
        start = time.time()
        with open(args.output / "train.log", "a") as log:
            subprocess.run(command, cwd=args.output, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        timing.write_text(json.dumps((time.time() - start) / 60))
    minutes = json.loads(timing.read_text())
    predicted = args.output / "valid-predicted.xyz"
    subprocess.run([str(bin_dir / "mace_eval_configs"), f"--configs={valid}", f"--model={model}",
                    f"--output={predicted}", "--device=cpu", "--batch_size=8", "--default_dtype=float32"], cwd=args.output, env=env, check=True)
    errors = per_file_errors(valid, predicted)
    result = {"mace_torch": "0.3.16", "epochs": args.epochs, "train_minutes_wall": minutes,
              "threads": 1, "model": "MACE 32x0e+32x1o, max_L=1, 2 interactions, r_max 5, float32, EMA 0.99",
              "per_file": errors}
    out = ROOT / "bench" / "results" / "mace_anchor.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"MACE trained {args.epochs} epochs in {minutes:.1f} min (one thread)")
    print(f"{'file':<28} {'E MAE meV/at':>13} {'F MAE eV/A':>11} {'F=0':>8} {'frames':>7}")
    for key, e in sorted(errors.items()):
        print(f"{key:<28} {e['energy_per_atom_mae_mev']:13.1f} {e['forces_mae']:11.4f} {e['forces_zero_mae']:8.4f} "
              f"{e['frames']:7d}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
