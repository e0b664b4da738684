"""The `janus` command: the library's `export`/`info` plus `train`, `eval` and `pack`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _report_resume(trainer) -> None:
    """Say where a `--resume` run starts: a missing checkpoint is not an error (the first
    run of a restartable job) but must not go unnoticed (a wrong run.output)."""
    if trainer.step:
        print(f"resuming from step {trainer.step} (epoch {trainer.epoch}, batch {trainer.batch_in_epoch})")
    else:
        print(f"no checkpoint found at {trainer.checkpoint_path}: training starts from scratch")


def _require_training_extra(command: str) -> None:
    from janus_potential.extras import require

    require("train", f"janus {command}", "yaml", "tqdm")


def _train(args: argparse.Namespace) -> int:
    _require_training_extra("train")
    from janus_potential.export import export_model
    from janus_potential.io import load_model

    from .config import TrainConfig
    from .trainer import Trainer
    from .evaluate import format_table

    config = TrainConfig.load(args.config, args.set)
    trainer = Trainer(config, resume=args.resume)
    is_main, output, checkpoint = trainer.is_main, trainer.output, trainer.checkpoint_path
    if args.resume and is_main:
        _report_resume(trainer)
    summary = trainer.fit()  # ends with a checkpoint
    # The final model is read back from that checkpoint by rank 0 alone, after every rank has
    # dropped its training state: a sharded model (`1b`) never exists twice in memory.
    trainer.close()
    del trainer
    if not is_main:
        return 0
    model = load_model(checkpoint)
    model.save_checkpoint(output / "model.ckpt", provenance=model.provenance)
    export_model(model, output / "model.pt", dtype=config.run.dtype)
    if summary:
        print(format_table(summary))
    print(f"wrote {checkpoint}, {output / 'model.ckpt'} and {output / 'model.pt'}")
    heads = list(model.config.output_heads)
    if heads:
        print(f"model.pt is output head {heads[0]!r}; the other heads: janus export {checkpoint} --head NAME "
              f"({', '.join(heads[1:])})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    _require_training_extra("eval")
    from .evaluate import evaluate, format_table
    from .progress import stderr_bars

    summary = evaluate(args.model, args.data, progress=stderr_bars(not args.json), group_by=args.by,
                       skip_unsupported=args.skip_unsupported, head=args.head)
    print(json.dumps(summary, indent=1) if args.json else format_table(summary))
    skipped = summary.get("all", {}).get("skipped_frames", 0)
    if skipped and not args.json:
        print(f"skipped {skipped} structure(s) with elements the model does not cover")
    return 0


def _pack(args: argparse.Namespace) -> int:
    _require_training_extra("pack")
    from .pack import pack_files

    manifest = pack_files(args.inputs, args.output, append=args.append, progress=True)
    statistics = manifest["statistics"]
    size = sum(shard["bytes"] for shard in manifest["shards"])
    print(f"{'appended to' if args.append else 'wrote'} {args.output}: {manifest['frames']:,} frames, "
          f"{manifest['atoms']:,} atoms, {len(manifest['elements'])} elements, {len(manifest['inputs'])} file(s), "
          f"{len(manifest['shards'])} shard(s), {size / 1e6:.1f} MB; labelled: energy {statistics['energy_frames']:,} "
          f"frames, forces {statistics['force_atoms']:,} atoms, stress {statistics['stress_frames']:,} frames")
    return 0


def add_training_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", nargs="?", help="YAML config (defaults for every missing key)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt if it exists")
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser("eval", help="errors of a model on labelled data (per source)")
    evaluate.add_argument("model", help="exported model.pt, model checkpoint or training checkpoint")
    evaluate.add_argument("data", nargs="+", help="ASE-readable files with energy/forces/stress labels")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument("--skip-unsupported", action="store_true",
                          help="leave out (and count) structures with elements the model does not cover "
                               "(default: refuse them)")
    evaluate.add_argument("--head", help="output head of a multi-head checkpoint (default: its first)")
    evaluate.add_argument("--by", choices=["source", "file"], default="source",
                          help="group errors by the frames' info['source'] (default) or by data file")
    evaluate.set_defaults(handler=_eval)

    pack = sub.add_parser("pack", help="pack ASE-readable data files into a folder training reads by random access")
    pack.add_argument("inputs", nargs="+", metavar="INPUT", help="ASE-readable files (extended XYZ, ASE databases)")
    pack.add_argument("-o", "--output", required=True, metavar="DIR", help="the packed dataset's folder")
    pack.add_argument("--append", action="store_true", help="add the files to the existing pack DIR")
    pack.set_defaults(handler=_pack)


def main(argv: Optional[List[str]] = None) -> int:
    from janus_potential.cli import build_parser, run

    parser, sub = build_parser()
    add_training_commands(sub)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
