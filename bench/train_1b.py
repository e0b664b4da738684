"""The `1b` preset trained by `janus train` on 2 ranks of this machine (issue: 1b inside the trainer).

    python bench/train_1b.py [--output /tmp/janus-1b] [--keep]

Runs, under `/usr/bin/time -v` on every rank:

    mpirun -np 2 janus train examples/1b.yaml --set model.preset=1b --set parallel.ep=2 --set parallel.shard=full

(ep=2 expert shards, dense parameters, gradients and AdamW moments sharded; no EMA; three
steps, a validation, the final checkpoint written in pieces, then rank 0 alone writes
`model.ckpt` and `model.pt` from it). Prints a table and writes bench/results/train_1b.json:
per step the time and every rank's peak RSS so far (from metrics.jsonl), per rank the peak
RSS of the whole process (training, checkpoint and, on rank 0, the export), the wall time
and the sizes of what was written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="/tmp/janus-1b")
    parser.add_argument("--keep", action="store_true", help="keep the run's files (about 30 GB)")
    args = parser.parse_args()
    output = Path(args.output)
    shutil.rmtree(output, ignore_errors=True)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    command = [str(BIN / "mpirun"), "-np", "2", "/usr/bin/time", "-v", str(BIN / "janus"), "train",
               str(ROOT / "examples" / "1b.yaml"), "--set", "model.preset=1b", "--set", "parallel.ep=2",
               "--set", "parallel.shard=full", "--set", f"run.output={output}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
    peaks = [int(kb) / 2**20 for kb in re.findall(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_total" in r]
    previous = 0.0
    rows = []
    for r in steps:
        rows.append({"step": r["step"], "step_s": round(r["elapsed_s"] - previous, 2), "atoms": r["train_atoms"],
                     "peak_rss_gib_per_rank": r["peak_rss_gib"]})
        previous = r["elapsed_s"]
    sizes = {name: sum(f.stat().st_size for f in (output / name).rglob("*")) if (output / name).is_dir()
             else (output / name).stat().st_size for name in ("checkpoint.pt", "checkpoint.parts", "model.ckpt", "model.pt")}
    result = {"command": " ".join(command[:1] + ["-np", "2", "janus"] + command[6:]), "machine": os.uname().nodename,
              "cores": os.cpu_count(), "steps": rows,
              "process_peak_rss_gib": [round(p, 2) for p in peaks],
              "training_peak_rss_gib_total": round(sum(max(r["peak_rss_gib_per_rank"][k] for r in rows)
                                                       for k in range(2)), 2),
              "wall_s": round(wall, 1), "bytes_written": sizes}
    print("| step | step s | atoms | peak RSS rank 0 / rank 1 (GiB) |\n| --: | --: | --: | --: |")
    for row in rows:
        print(f"| {row['step']} | {row['step_s']:.1f} | {row['atoms']} | "
              f"{' / '.join(f'{v:.2f}' for v in row['peak_rss_gib_per_rank'])} |")
    print(f"whole processes (incl. checkpoint; rank 0 also the export): peak RSS "
          f"{' / '.join(f'{p:.2f}' for p in peaks)} GiB; wall {wall:.0f} s; written "
          + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items()))
    path = ROOT / "bench" / "results" / "train_1b.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)


if __name__ == "__main__":
    main()
