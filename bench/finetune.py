"""Fine-tuning study on dft-89: pretrain on five files, adapt to the sixth.

    python bench/finetune.py [--data ../shared/data/dft-89] [--target mpf-alkali-TP]
                             [--pretrain-minutes 15] [--minutes 3] [--sizes 10 100 all] [--jobs 2]

Every file is split once (seed 0) into 80 % training and 20 % held-out frames. A parent
(`small`, one thread) is pretrained on the training frames of the five other files for
`--pretrain-minutes`; then, for each size N of the target file's training frames (the first
N of a fixed shuffle), four runs of `--minutes` of step time each, one thread each,
`--jobs` at a time:

- scratch: `small` from its random start on the N frames;
- finetune: `model.init_from` the parent (all weights trained, fresh AdamW, lower rate);
- finetune+replay: the same with `data.replay` = the five files' training frames,
  `data.replay_fraction` 0.5;
- lora: `model.init_from` the parent with rank-8 adapters (`model.lora_rank`), base frozen.

Every model (parent included) is evaluated with `janus eval --by file` on the held-out
frames of all six files (EMA weights). Reported: the target file's energy and force MAE,
and the five pretraining files' mean force MAE against the parent's (forgetting). Targets
(issue 13): finetune on 100 frames beats scratch on the same frames and time by >= 2x in
force MAE; with replay the other files' force MAE rises by <= 10 %. Writes
bench/results/finetune.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FILES = ["mptrj-random-1k", "mptrj-highest-stress-1k", "alexandria-random-1k", "mpf-TP", "mpf-alkali-TP", "random-TP"]


def split(data: Path, work: Path, target: str) -> dict:
    from ase.io import read, write

    parts = {}
    for name in FILES:
        frames = read(data / f"{name}.xyz", ":")
        order = np.random.default_rng(0).permutation(len(frames))
        cut = int(round(0.8 * len(frames)))
        train, test = [frames[k] for k in order[:cut]], [frames[k] for k in order[cut:]]
        for atoms in train + test:
            atoms.info["source"] = name
        write(work / f"{name}.train.xyz", train, format="extxyz")
        write(work / f"{name}.test.xyz", test, format="extxyz")
        parts[name] = len(train)
    return parts


def train(work: Path, name: str, overrides: list, log: Path) -> Path:
    output = work / name
    command = [str(BIN / "janus"), "train", "--set", f"run.output={output}", "--set", "run.threads=1",
               "--set", "run.progress=false", "--set", f"data.cache_dir={work / 'cache'}",
               "--set", "data.validation_fraction=0", "--set", "data.num_workers=1",
               "--set", "run.log_every=20", "--set", "run.checkpoint_every=100000",
               *[item for o in overrides for item in ("--set", o)]]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"run {name} failed, see {log}")
    return output / "model.pt"


def evaluate(model: Path, work: Path) -> dict:
    command = [str(BIN / "janus"), "eval", str(model), *[str(work / f"{n}.test.xyz") for n in FILES],
               "--json", "--by", "file", "--skip-unsupported"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    return {n: {"energy_mev": 1000 * summary[f"{n}.test"]["energy_per_atom"]["mae"],
                "forces": summary[f"{n}.test"]["forces"]["mae"],
                "forces_zero": summary[f"{n}.test"]["forces_zero"]["mae"]} for n in FILES if f"{n}.test" in summary}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dft-89"))
    parser.add_argument("--target", default="mpf-alkali-TP", choices=FILES)
    parser.add_argument("--pretrain-minutes", type=float, default=15.0)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--sizes", nargs="+", default=["10", "100", "all"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", default="runs/finetune-study")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "finetune.json"))
    args = parser.parse_args()
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    counts = split(Path(args.data), work, args.target)
    others = [n for n in FILES if n != args.target]
    pretrain_data = "[" + ", ".join(str(work / f"{n}.train.xyz") for n in others) + "]"
    # every model covers every element (restrict_elements off): all are scored on the same frames
    common = ["optim.max_steps=1000000", "data.max_atoms_per_batch=256", "model.preset=small",
              "model.restrict_elements=false"]
    parent_model = work / "parent" / "model.pt"
    if not parent_model.exists():
        print(f"pretraining the parent on {', '.join(others)} for {args.pretrain_minutes} min", flush=True)
        train(work, "parent", common + [f"data.train={pretrain_data}", f"run.max_minutes={args.pretrain_minutes}",
                                        "optim.lr=0.002", "optim.warmup_steps=100"], work / "parent.log")
    parent = str(work / "parent" / "checkpoint.pt")

    from ase.io import read, write

    target_frames = read(work / f"{args.target}.train.xyz", ":")
    runs = []
    for size in args.sizes:
        n = len(target_frames) if size == "all" else int(size)
        subset = work / f"{args.target}.first{n}.xyz"
        write(subset, target_frames[:n], format="extxyz")
        data = [f"data.train=[{subset}]", f"run.max_minutes={args.minutes}"]
        recipes = {
            "scratch": ["optim.lr=0.002", "optim.warmup_steps=20"],
            "finetune": [f"model.init_from={parent}", "optim.lr=0.0005", "optim.warmup_steps=10"],
            "finetune+replay": [f"model.init_from={parent}", "optim.lr=0.0005", "optim.warmup_steps=10",
                                f"data.replay={pretrain_data}", "data.replay_fraction=0.5"],
            "lora": [f"model.init_from={parent}", "model.lora_rank=8", "optim.lr=0.002", "optim.warmup_steps=10"],
        }
        for recipe, extra in recipes.items():
            runs.append((n, recipe, f"{recipe.replace('+', '-')}-{n}", common + data + extra))

    def run(item):
        n, recipe, name, overrides = item
        model = work / name / "model.pt"
        if not model.exists():
            train(work, name, overrides, work / f"{name}.log")
        print(f"done: {name}", flush=True)
        return item, model

    with ThreadPoolExecutor(args.jobs) as pool:
        finished = list(pool.map(run, runs))
    parent_errors = evaluate(parent_model, work)
    rows = [{"frames": 0, "recipe": "parent (pretrained, no target data)", **summarise(parent_errors, args.target,
                                                                                      others, parent_errors)}]
    for (n, recipe, name, _), model in finished:
        rows.append({"frames": n, "recipe": recipe, **summarise(evaluate(model, work), args.target, others,
                                                                parent_errors)})
    scratch = {r["frames"]: r["target_forces"] for r in rows if r["recipe"] == "scratch"}
    for r in rows:
        if r["frames"] in scratch and r["recipe"] != "scratch":
            r["scratch_over_this"] = scratch[r["frames"]] / r["target_forces"]
    print(f"\ntarget file {args.target} (held-out frames); others = mean over {', '.join(others)}")
    print("| frames | recipe | target E MAE meV/atom | target F MAE eV/A | scratch F / this F | others F MAE | "
          "others F vs parent |\n| --: | --- | --: | --: | --: | --: | --: |")
    for r in rows:
        ratio = f"{r['scratch_over_this']:.2f}" if "scratch_over_this" in r else "-"
        print(f"| {r['frames']} | {r['recipe']} | {r['target_energy_mev']:.1f} | {r['target_forces']:.3f} | {ratio} | "
              f"{r['others_forces']:.3f} | {100 * r['others_change']:+.1f} % |")
    result = {"command": " ".join(sys.argv), "target": args.target, "pretrain_minutes": args.pretrain_minutes,
              "minutes": args.minutes, "train_frames": counts, "rows": rows, "wall_s": round(time.time() - start)}
    out = Path(args.output)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def summarise(errors: dict, target: str, others: list, parent: dict) -> dict:
    others_forces = float(np.mean([errors[n]["forces"] for n in others]))
    parent_forces = float(np.mean([parent[n]["forces"] for n in others]))
    return {"target_energy_mev": errors[target]["energy_mev"], "target_forces": errors[target]["forces"],
            "target_forces_zero": errors[target]["forces_zero"], "others_forces": others_forces,
            "others_change": others_forces / parent_forces - 1, "per_file": errors}


if __name__ == "__main__":
    main()
