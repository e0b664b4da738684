"""The `janus` command: one small parser per subcommand (export, info, train, eval, md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, List, Optional

from .errors import JanusInputError

Handler = Callable[[argparse.Namespace], int]


def _export(args: argparse.Namespace) -> int:
    from .export import export_model

    model = load_for_export(args.checkpoint)
    metadata = export_model(model, args.output, dtype=args.dtype)
    print(f"wrote {args.output}: {metadata['dtype']}, cutoff {metadata['cutoff']} A, "
          f"{metadata['num_interactions']} layers, {len(metadata['elements'])} elements, "
          f"{metadata['parameters']['total_parameters']:,} parameters")
    return 0


def load_for_export(path: str):
    """A checkpoint written by `JanusPotential.save` or by the trainer (EMA weights)."""
    from .model import JanusPotential

    try:
        from janus_potential.training.checkpoint import load_model_for_export
    except ImportError:  # the training package is optional at this level
        return JanusPotential.load(path)
    return load_model_for_export(path)


def _info(args: argparse.Namespace) -> int:
    from .export import is_exported_file, read_metadata
    from .model import JanusPotential

    if is_exported_file(args.model):
        info = read_metadata(args.model)
    else:
        model = JanusPotential.load(args.model)
        info = {"config": model.config.to_dict(), "parameters": model.parameter_report()}
    print(json.dumps(info, indent=1))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a TorchScript model file for LAMMPS and ASE")
    p.add_argument("checkpoint", help="checkpoint written by training or JanusPotential.save")
    p.add_argument("-o", "--output", default="model.pt", help="output file (default: model.pt)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.set_defaults(handler=_export)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print the metadata of a model file or checkpoint")
    p.add_argument("model")
    p.set_defaults(handler=_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="janus", description="Janus machine-learning interatomic potential")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    _add_info(sub)
    try:
        from janus_potential.training.cli import add_training_commands
    except ImportError:
        pass
    else:
        add_training_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except JanusInputError as exc:
        print(f"janus: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
