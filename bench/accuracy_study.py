"""Accuracy study (issue 14): named training recipes, N minutes each on one thread, compared
per data file on the validation split next to two baselines computed on the same frames.

    python bench/accuracy_study.py --minutes 60 --recipes baseline frame-norm ... [--parallel 2]
    python bench/accuracy_study.py --report-only            # tables and plots of finished runs

Each recipe is `janus train examples/accuracy.yaml` with `--set` overrides (RECIPES below),
`run.threads=1`, `run.max_minutes=N` (minutes of step time), one run directory per recipe
under `--output`. A finished run (model.pt present, same minutes) is not run again unless
`--force`. The evaluation is the run's last validation record (EMA weights, every frame of
the validation split, grouped by data file): energy MAE per atom, force MAE, stress MAE, and
the baselines on the same frames: zero forces (`F=0`), zero stress and the per-element
reference-energy fit alone (`E ref`, the least-squares fit the model starts from), and the
same MAEs on the run's training frames (`E train`, `F train`: the generalisation gap).
Writes bench/results/accuracy_study.json (tables and learning curves) and
accuracy_study.png (validation errors per file against training time, one line per recipe).

Stability over seeds (the blow-ups of docs/training.md, "The scaled router against its control"):

    python bench/accuracy_study.py --minutes 60 --stop-after 25 --seeds 0 1 2 --recipes A B --parallel 3

`--seeds` runs every recipe once per seed (runs named `recipe@seedN`, `run.seed=N`);
`--stop-after M` stops each run after M wall-clock minutes, its schedule still that of
`--minutes` (the learning rate's cosine follows the clock, so the early, high-learning-rate
part of an N-minute run is what is measured; the evaluation is the last validation record,
without the training-frame errors). The stability table counts per run the blow-ups (the
all-files validation force error up by more than 30 % between two validations after step
1,000), the largest gradient norm logged, and the steps clipped and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "examples" / "accuracy.yaml"


def experts2(*sets: str, model: str = "") -> list[str]:
    """The two-expert recipe's changes against `baseline` (lr 2e-3, clipping at 1, two experts
    top-1), then `sets` (later values win) and the model options `model` ("key: value, ...")."""
    options = "num_experts: 2, experts_per_atom: 1" + (f", {model}" if model else "")
    return ["optim.lr=0.002", "optim.grad_clip=1.0", *sets, f"model.overrides={{{options}}}"]


# name -> --set overrides of examples/accuracy.yaml (its own values are the "current" recipe)
RECIPES: dict[str, list[str]] = {
    # the recipe of issue 14's table: accuracy.yaml as it was (absolute Huber loss, delta 0.1,
    # lr 1e-3, clipping at gradient norm 10, the preset's eight experts: a recipe's own
    # model.overrides replaces the whole mapping, so every recipe below has eight experts
    # unless it says otherwise)
    "baseline": ["loss.forces_normalization=none", "loss.file_balance=none", "loss.energy_weight=1",
                 "loss.energy_huber_delta=0", "loss.forces_huber_delta=0", "data.max_atoms_per_batch=256",
                 "optim.lr=0.001", "optim.grad_clip=10", "model.overrides={}"],
    # each frame's force errors divided by its force scale (floor 0.1 eV/A)
    "frame-norm": ["loss.forces_normalization=frame", "loss.file_balance=none", "loss.energy_weight=1"],
    # every data file the same total loss weight (by frame count)
    "file-balance": ["loss.forces_normalization=none", "loss.file_balance=frames", "loss.energy_weight=1"],
    "frame-norm+balance": ["loss.forces_normalization=frame", "loss.file_balance=frames", "loss.energy_weight=1"],
    # the energy term 10x heavier
    "energy-x10": ["loss.forces_normalization=none", "loss.file_balance=none", "loss.energy_weight=10"],
    "frame-norm+energy-x10": ["loss.forces_normalization=frame", "loss.file_balance=none", "loss.energy_weight=10"],
    "all": ["loss.forces_normalization=frame", "loss.file_balance=frames", "loss.energy_weight=10"],
}
# one change each against "baseline" (screening, 10 minutes)
for _name, _change in {
    "energy-x3": ["loss.energy_weight=3"],
    "frame-norm-0.5": ["loss.forces_normalization=frame", "loss.forces_scale_floor=0.5"],
    "batch64": ["data.max_atoms_per_batch=64"],
    "lr3e-3": ["optim.lr=0.003"],
    "lr3e-4": ["optim.lr=0.0003"],
    "no-zbl": ["model.overrides={zbl: false}"],
    "ema0.999": ["optim.ema_decay=0.999"],
    "mse": ["loss.kind=mse"],
    "stress1": ["loss.stress_weight=1"],
    "3body3.5": ["model.overrides={three_body_cutoff: 3.5}"],
    "cutoff6": ["model.overrides={cutoff: 6.0}"],
    "experts16-top2": ["model.overrides={num_experts: 16, experts_per_atom: 2}"],
    "wide96": ["model.overrides={features: 96}"],
    "deep4": ["model.overrides={num_interactions: 4}"],
    "energy-structure": ["loss.energy_per=structure"],
    "wd1e-2": ["optim.weight_decay=0.01"],
    # a second loss stage over the last quarter of the budget (as MACE's last stage): the
    # energy weight 10x / 100x, on the chosen recipe (lr2e-3-clip1 = examples/accuracy.yaml)
    "stage2-e10": ["optim.lr=0.002", "optim.grad_clip=1.0", "loss.stage_two_start=0.75",
                   "loss.stage_two_energy_factor=10"],
    "stage2-e100": ["optim.lr=0.002", "optim.grad_clip=1.0", "loss.stage_two_start=0.75",
                    "loss.stage_two_energy_factor=100"],
    "wd1e-3": ["optim.weight_decay=0.001"],
    # AdamW's weight decay on the chosen recipe: at sixty minutes the model fits its training
    # frames twice as well as the validation frames (docs/training.md)
    "clip1-wd3e-2": ["optim.lr=0.002", "optim.grad_clip=1.0", "optim.weight_decay=0.03"],
    "clip1-wd1e-1": ["optim.lr=0.002", "optim.grad_clip=1.0", "optim.weight_decay=0.1"],
    # fewer experts (each sees more of the frames; same cost per atom at top-1)
    "clip1-experts2": ["optim.lr=0.002", "optim.grad_clip=1.0", "model.overrides={num_experts: 2, experts_per_atom: 1}"],
    "clip1-experts1": ["optim.lr=0.002", "optim.grad_clip=1.0", "model.overrides={num_experts: 1, experts_per_atom: 1}"],
    # weight decay on the two-expert recipe (examples/accuracy.yaml)
    "experts2-wd3e-2": ["optim.lr=0.002", "optim.grad_clip=1.0", "optim.weight_decay=0.03",
                        "model.overrides={num_experts: 2, experts_per_atom: 1}"],
    "experts2-wd1e-1": ["optim.lr=0.002", "optim.grad_clip=1.0", "optim.weight_decay=0.1",
                        "model.overrides={num_experts: 2, experts_per_atom: 1}"],
    # the element embedding of chemical descriptors (model option element_features)
    "experts2-elements": ["optim.lr=0.002", "optim.grad_clip=1.0",
                          "model.overrides={num_experts: 2, experts_per_atom: 1, element_features: true}"],
    "clip1-elements": ["optim.lr=0.002", "optim.grad_clip=1.0", "model.overrides={element_features: true}"],
    # the recipe with another seed (its run-to-run spread at 60 minutes), and with sixteen
    # experts (top-1: the same compute per atom as eight, twice the expert parameters)
    "clip1-elements-seed1": ["optim.lr=0.002", "optim.grad_clip=1.0", "run.seed=1",
                             "model.overrides={element_features: true}"],
    "clip1-elements-experts16": ["optim.lr=0.002", "optim.grad_clip=1.0",
                                 "model.overrides={element_features: true, num_experts: 16}"],
    # the recipe again with another initialisation and batch order (run-to-run spread)
    "experts2-seed1": ["optim.lr=0.002", "optim.grad_clip=1.0", "run.seed=1",
                       "model.overrides={num_experts: 2, experts_per_atom: 1}"],
    # loss options not yet run on the recipe: the energy error per structure (eV), not per atom
    "experts2-energy-structure": ["optim.lr=0.002", "optim.grad_clip=1.0", "loss.energy_per=structure",
                                  "model.overrides={num_experts: 2, experts_per_atom: 1}"],
    "experts2-elements-wd3e-2": ["optim.lr=0.002", "optim.grad_clip=1.0", "optim.weight_decay=0.03",
                                 "model.overrides={num_experts: 2, experts_per_atom: 1, element_features: true}"],
    "experts2-elements-wd1e-1": ["optim.lr=0.002", "optim.grad_clip=1.0", "optim.weight_decay=0.1",
                                 "model.overrides={num_experts: 2, experts_per_atom: 1, element_features: true}"],
    # the router's Adam steps 100x smaller (nn/moe.py, "Router steps"): routing that settles
    "clip1-elements-router": ["optim.lr=0.002", "optim.grad_clip=1.0",
                              "model.overrides={element_features: true, router_scale: 0.01}"],
    "clip1-elements-router-seed1": ["optim.lr=0.002", "optim.grad_clip=1.0", "run.seed=1",
                                    "model.overrides={element_features: true, router_scale: 0.01}"],
    "experts2-router": ["optim.lr=0.002", "optim.grad_clip=1.0",
                        "model.overrides={num_experts: 2, experts_per_atom: 1, router_scale: 0.01}"],
    "experts2-router-seed1": ["optim.lr=0.002", "optim.grad_clip=1.0", "run.seed=1",
                              "model.overrides={num_experts: 2, experts_per_atom: 1, router_scale: 0.01}"],
    # stabilisers against the blow-ups (docs/training.md, "Blow-ups"), on the two-expert recipe:
    # skip a step whose gradient norm is over 10x the median of the last 100; Adam's beta2 0.99
    "experts2-skip10": experts2("optim.skip_spikes=10"),
    "experts2-beta2-0.99": experts2("optim.beta2=0.99"),
    # a LayerNorm before each layer's three-body, value and query/key projections (model option
    # attention_norm): their weights' gradients no longer grow with the residual stream
    "experts2-attnorm": experts2(model="attention_norm: true"),
    "experts2-attnorm-lr3e-3": experts2("optim.lr=0.003", model="attention_norm: true"),
    "experts2-attnorm-beta2-0.99": experts2("optim.beta2=0.99", model="attention_norm: true"),
    "energy-delta1": ["loss.energy_huber_delta=1.0"],
    # a higher learning rate held stable by tighter clipping (lr3e-3 alone diverged)
    "lr2e-3-clip1": ["optim.lr=0.002", "optim.grad_clip=1.0"],
    "clip1": ["optim.grad_clip=1.0"],
}.items():
    RECIPES[_name] = RECIPES["baseline"] + _change
FILES = ["mptrj-random-1k", "alexandria-random-1k", "mptrj-highest-stress-1k", "mpf-TP", "mpf-alkali-TP",
         "random-TP"]


def run_directory(output: Path, name: str, minutes: float) -> Path:
    return output / f"{name}-{minutes:g}min"


def run_names(recipes: list[str], seeds: list[int] | None) -> list[str]:
    """A run per recipe, or per recipe and seed (`recipe@seedN`), seed by seed: the recipes of
    one seed run side by side, on the same machine load."""
    return list(recipes) if seeds is None else [f"{recipe}@seed{seed}" for seed in seeds for recipe in recipes]


def overrides(name: str) -> list[str]:
    """The `--set` overrides of run `name` (`recipe` or `recipe@seedN`)."""
    recipe, _, seed = name.partition("@seed")
    return RECIPES[recipe] + ([f"run.seed={int(seed)}"] if seed else [])


def command(name: str, minutes: float, output: Path, extra: list[str]) -> list[str]:
    sets = [f"run.output={run_directory(output, name, minutes)}", f"run.max_minutes={minutes}", "run.threads=1",
            "run.progress=false", "data.num_workers=1", *overrides(name), *extra]
    return [sys.executable, "-m", "janus_potential.training", "train", str(CONFIG)] + [
        arg for item in sets for arg in ("--set", item)]


def finished(directory: Path) -> bool:
    """A run that ended (model.pt) or was stopped by `--stop-after` (the marker `stopped`)."""
    return (directory / "metrics.jsonl").is_file() and any((directory / f).is_file() for f in ("model.pt", "stopped"))


def run_recipes(names: list[str], minutes: float, output: Path, parallel: int, force: bool, extra: list[str],
                stop_after: float = 0.0) -> None:
    # the project's run environment (Makefile): passive OpenMP threads, no malloc trimming
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="33554432",
               MALLOC_TRIM_THRESHOLD_="10000000000")
    queue = [n for n in names if force or not finished(run_directory(output, n, minutes))]
    running: list[tuple[str, subprocess.Popen, float]] = []
    output.mkdir(parents=True, exist_ok=True)
    while queue or running:
        while queue and len(running) < parallel:
            name = queue.pop(0)
            log = open(output / f"{name}-{minutes:g}min.log", "w")
            print(f"[{time.strftime('%H:%M:%S')}] start {name}: {minutes:g} min", flush=True)
            (run_directory(output, name, minutes) / "stopped").unlink(missing_ok=True)
            running.append((name, subprocess.Popen(command(name, minutes, output, extra), cwd=ROOT, env=env,
                                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
                            time.time()))
        time.sleep(5)
        for entry in list(running):
            name, process, started = entry
            if stop_after and process.poll() is None and time.time() - started > 60 * stop_after:
                os.killpg(process.pid, signal.SIGTERM)  # the run and its data-loading worker
                process.wait()
                (run_directory(output, name, minutes) / "stopped").write_text(f"{stop_after} minutes\n")
                running.remove(entry)
                print(f"[{time.strftime('%H:%M:%S')}] {name}: stopped after {stop_after:g} min", flush=True)
                continue
            if process.poll() is not None:
                running.remove(entry)
                state = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode}, see the log)"
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {state} after {(time.time() - started) / 60:.1f} min",
                      flush=True)


def read_run(directory: Path) -> dict:
    train, validation = [], []
    for line in (directory / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        (validation if "validation" in record else train).append(record)
    if not validation:
        raise SystemExit(f"{directory}/metrics.jsonl has no validation record")
    return {"steps": validation[-1]["step"], "minutes": validation[-1]["elapsed_s"] / 60,
            "final": validation[-1]["validation"], "stability": stability(train, validation),
            "curve": [{"step": r["step"], "minutes": r["elapsed_s"] / 60, "errors": r["validation"]}
                      for r in validation]}


def stability(train: list[dict], validation: list[dict]) -> dict:
    """Blow-ups (steps of the validations where the all-files force MAE rose by more than 30 %
    over the previous validation, after step 1,000), the largest gradient norm logged (every
    step's since `train_grad_norm_max` was logged, else the records' own), the steps clipped
    and skipped (`optim.skip_spikes`) where logged."""
    forces = [(r["step"], r["validation"].get("all", {}).get("forces", {}).get("mae")) for r in validation]
    blowups = [step for (_, before), (step, after) in zip(forces, forces[1:])
               if step > 1000 and before and after and after > 1.3 * before]
    norms = [r.get("train_grad_norm_max", r.get("train_grad_norm", 0.0)) for r in train]
    return {"blowups": blowups, "grad_norm_max": max(norms, default=float("nan")),
            "clipped_steps": sum(r.get("train_clipped_steps", 0) for r in train),
            "skipped_steps": sum(r.get("train_skipped_steps", 0) for r in train)}


def stability_table(results: dict) -> str:
    lines = ["| run | steps | blow-ups (step) | largest gradient norm | clipped steps | skipped steps | E all | F all |",
             "| --- | --: | --- | --: | --: | --: | --: | --: |"]
    for name, run in results.items():
        entry, record = run["final"].get("all"), run["stability"]
        lines.append(f"| {name} | {run['steps']} | {', '.join(map(str, record['blowups'])) or 'none'} | "
                     f"{record['grad_norm_max']:.3g} | {record['clipped_steps']} | {record['skipped_steps']} | "
                     f"{mae(entry, 'energy_per_atom', 1000):.1f} | {mae(entry, 'forces'):.3f} |")
    return "\n".join(lines)


def training_split_errors(directory: Path, final: dict) -> dict:
    """MAEs on the TRAINING frames of each data file (the generalisation gap next to the
    validation split): `janus eval` of the run's checkpoint (EMA weights, as the validation)
    on every frame of the files, cached in the run directory as eval_all_frames.json; an MAE
    is a sum over its count, so the training split's MAE is (all - validation) sums over
    (all - validation) counts, exactly."""
    cached = directory / "eval_all_frames.json"
    if not cached.is_file():
        import yaml

        paths = [str((CONFIG.parent / p).resolve()) for p in yaml.safe_load(CONFIG.read_text())["data"]["train"]]
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "janus_potential.training", "eval", str(directory / "checkpoint.pt"),
                               *paths, "--by", "file", "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"janus eval of {directory} failed:\n{done.stderr[-2000:]}")
        cached.write_text(done.stdout)
    every = json.loads(cached.read_text())
    out = {}
    for stem in FILES + ["all"]:
        key_all, key_validation = ("all", "all") if stem == "all" else (file_key(every, stem), file_key(final, stem))
        if key_all is None or key_validation is None:
            continue
        out[stem] = {}
        for quantity in ("energy_per_atom", "forces"):
            a, v = every[key_all].get(quantity), final[key_validation].get(quantity)
            if a and v and a["count"] > v["count"]:
                out[stem][quantity] = {"mae": (a["mae"] * a["count"] - v["mae"] * v["count"]) / (a["count"] - v["count"]),
                                       "count": a["count"] - v["count"]}
    return out


def file_key(errors: dict, stem: str) -> str | None:
    return next((k for k in errors if Path(k).stem == stem), None)


def mae(entry: dict | None, key: str, scale: float = 1.0) -> float:
    value = (entry or {}).get(key, {}).get("mae")
    return float("nan") if value is None else scale * value


def table(results: dict) -> str:
    lines = ["| recipe | file | E MAE meV/at | E train | E ref fit | F MAE eV/A | F train | F=0 | S MAE GPa | S=0 | steps |",
             "| --- | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |"]
    for name, run in results.items():
        for stem in FILES + ["all"]:
            key = "all" if stem == "all" else file_key(run["final"], stem)
            entry = run["final"].get(key) if key else None
            if entry is None:
                continue
            fit = run.get("training_split", {}).get(stem)
            lines.append(f"| {name} | {stem} | {mae(entry, 'energy_per_atom', 1000):.1f} | "
                         f"{mae(fit, 'energy_per_atom', 1000):.1f} | "
                         f"{mae(entry, 'energy_reference_per_atom', 1000):.1f} | {mae(entry, 'forces'):.3f} | "
                         f"{mae(fit, 'forces'):.3f} | "
                         f"{mae(entry, 'forces_zero'):.3f} | {mae(entry, 'stress_gpa'):.2f} | "
                         f"{mae(entry, 'stress_zero_gpa'):.2f} | {run['steps']} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(FILES), figsize=(4 * len(FILES), 7), squeeze=False)
    for name, run in results.items():
        for column, stem in enumerate(FILES):
            key = file_key(run["final"], stem)
            if key is None:
                continue
            minutes = [r["minutes"] for r in run["curve"]]
            axes[0][column].plot(minutes, [mae(r["errors"].get(key), "energy_per_atom", 1000) for r in run["curve"]],
                                 label=name)
            axes[1][column].plot(minutes, [mae(r["errors"].get(key), "forces") for r in run["curve"]], label=name)
            zero = mae(run["final"][key], "forces_zero")
            axes[1][column].axhline(zero, color="k", ls=":", lw=1)
            axes[0][column].set_title(stem)
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_xlabel("step time (min)")
    axes[0][0].set_ylabel("energy MAE (meV/atom)")
    axes[1][0].set_ylabel("force MAE (eV/A); dotted: F=0")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["baseline"], choices=sorted(RECIPES))
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--parallel", type=int, default=1, help="recipes trained at once (one thread each)")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "accuracy-study")
    parser.add_argument("--results", default="accuracy_study", help="name of the JSON/PNG in bench/results")
    parser.add_argument("--force", action="store_true", help="train again even where a finished run exists")
    parser.add_argument("--report-only", action="store_true", help="only read finished runs")
    parser.add_argument("--no-training-split", action="store_true",
                        help="skip the errors on the training frames (a `janus eval` of every frame per run)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="override for every recipe")
    parser.add_argument("--seeds", type=int, nargs="+", help="run every recipe once per seed (`recipe@seedN`)")
    parser.add_argument("--stop-after", type=float, default=0.0,
                        help="stop each run after this many wall-clock minutes (its schedule stays --minutes)")
    args = parser.parse_args()
    names = run_names(args.recipes, args.seeds)
    if not args.report_only:
        run_recipes(names, args.minutes, args.output, args.parallel, args.force, args.extra, args.stop_after)
    results = {name: read_run(run_directory(args.output, name, args.minutes)) for name in names
               if (run_directory(args.output, name, args.minutes) / "metrics.jsonl").is_file()}
    for name in results:
        results[name]["overrides"] = overrides(name) + args.extra
        stopped = (run_directory(args.output, name, args.minutes) / "stopped").is_file()
        results[name]["stopped"] = stopped
        if not (args.no_training_split or stopped):
            results[name]["training_split"] = training_split_errors(run_directory(args.output, name, args.minutes),
                                                                    results[name]["final"])
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": f"{os.cpu_count()} cores, one thread per run", "minutes": args.minutes,
           "stop_after_minutes": args.stop_after or None,
           "config": str(CONFIG.relative_to(ROOT)), "runs": results}
    plot(results, RESULTS / f"{args.results}.png")
    for run in results.values():  # the JSON keeps the curves' MAEs only (the full records are in metrics.jsonl)
        run["curve"] = [{"step": r["step"], "minutes": round(r["minutes"], 3),
                         "mae": {group: {q: round(v["mae"], 6) for q, v in errors.items() if isinstance(v, dict)}
                                 for group, errors in r["errors"].items()}} for r in run["curve"]]
    (RESULTS / f"{args.results}.json").write_text(json.dumps(out, indent=1))
    print(table(results))
    print(stability_table(results))
    print(f"wrote {RESULTS / (args.results + '.json')} and {RESULTS / (args.results + '.png')}")


if __name__ == "__main__":
    main()
