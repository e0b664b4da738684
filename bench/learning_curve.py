"""Learning curve of a training run: validation errors against training time and steps.

    python bench/learning_curve.py runs/accuracy [--label "small, 60 min"]
Reads RUN/metrics.jsonl; writes bench/results/learning_curve.json and learning_curve.png
and prints the final validation table by source.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def read_curve(run: Path) -> tuple[list[dict], list[dict]]:
    train, validation = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        (validation if "validation" in record else train).append(record)
    return train, validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    train, validation = read_curve(args.run)
    if not validation:
        raise SystemExit(f"{args.run}/metrics.jsonl has no validation records yet")
    sources = sorted(k for k in validation[-1]["validation"] if k != "all") + ["all"]
    curve = {
        "run": str(args.run), "label": args.label or args.run.name,
        "train": [{k: r[k] for k in ("step", "elapsed_s", "train_total", "train_energy", "train_forces", "lr")
                   if k in r} for r in train],
        "validation": [{"step": r["step"], "elapsed_s": r["elapsed_s"], "errors": r["validation"]} for r in validation],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "learning_curve.json").write_text(json.dumps(curve, indent=1))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    minutes = [r["elapsed_s"] / 60 for r in validation]
    for source in sources:
        errors = [r["validation"].get(source, {}) for r in validation]
        style = dict(lw=2.5, color="k") if source == "all" else dict(lw=1.2)
        axes[0].plot(minutes, [1000 * e.get("energy_per_atom", {}).get("mae", float("nan")) for e in errors],
                     label=source, **style)
        axes[1].plot(minutes, [e.get("forces", {}).get("mae", float("nan")) for e in errors], label=source, **style)
        axes[2].plot(minutes, [e.get("stress_gpa", {}).get("mae", float("nan")) for e in errors], label=source, **style)
    for ax, title in zip(axes, ["energy MAE (meV/atom)", "force MAE (eV/A)", "stress MAE (GPa)"]):
        ax.set_xlabel("training time (min, step time)")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Janus validation errors: {curve['label']}")
    fig.tight_layout()
    fig.savefig(RESULTS / "learning_curve.png", dpi=110)

    final = validation[-1]["validation"]
    print(f"after {validation[-1]['step']} steps, {validation[-1]['elapsed_s'] / 60:.1f} min of step time")
    print(f"{'source':<28} {'E MAE meV/at':>13} {'F MAE eV/A':>11} {'S MAE GPa':>10} {'frames':>7}")
    for source in sources:
        e = final[source]
        print(f"{source:<28} {1000 * e.get('energy_per_atom', {}).get('mae', float('nan')):13.1f} "
              f"{e.get('forces', {}).get('mae', float('nan')):11.4f} {e.get('stress_gpa', {}).get('mae', float('nan')):10.3f} "
              f"{e.get('energy_per_atom', {}).get('count', 0):7d}")
    print(f"wrote {RESULTS / 'learning_curve.json'} and {RESULTS / 'learning_curve.png'}")


if __name__ == "__main__":
    main()
