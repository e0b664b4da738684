"""Library subcommands of the `janus` command: `export` and `info`.

The `janus` console script is the training application's (`janus_potential.training.cli`),
which adds `train`, `eval` and `pack` and lets `export` read training checkpoints; the library
never imports the training package (DESIGN.md's arrows). `python -m janus_potential` runs
these library commands alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

from .errors import JanusInputError

Handler = Callable[[argparse.Namespace], int]


def _export(args: argparse.Namespace) -> int:
    from .export import export_model

    from .io import load_model

    folder = Path(args.output).parent
    if not folder.is_dir():
        raise JanusInputError(f"cannot write {args.output}: folder {str(folder)!r} does not exist")
    model = load_model(args.checkpoint)
    heads = list(model.config.output_heads)
    if heads and args.head is None:
        print(f"note: the model has output heads {', '.join(heads)}; exporting {heads[0]!r} (choose with --head)")
    if args.format == "aoti":
        from .aoti import export_aoti

        print(f"compiling {args.output} with AOTInductor (a minute or more per function)...", flush=True)
        metadata = export_aoti(model, args.output, dtype=args.dtype, head=args.head,
                               progress=lambda line: print(f"  {line}", flush=True))
    else:
        metadata = export_model(model, args.output, dtype=args.dtype, head=args.head)
    print(f"wrote {args.output}: {metadata['dtype']}, cutoff {metadata['cutoff']} A, "
          f"{metadata['num_interactions']} layers, {len(metadata['elements'])} elements, "
          f"{metadata['parameters']['total_parameters']:,} parameters")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .elements import number_to_symbol
    from .export import read_metadata
    from .io import is_torchscript_file, load_model

    from .aoti import PackagedPotential, is_aoti_file

    if is_aoti_file(args.model):
        info = PackagedPotential(args.model).metadata
    elif is_torchscript_file(args.model):
        info = read_metadata(args.model)
    else:
        model = load_model(args.model)
        info = {"elements": [number_to_symbol(z) for z in model.supported_elements()],
                "config": model.config.to_dict(), "parameters": model.parameter_report()}
    print(json.dumps(info, indent=1))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model file for LAMMPS and ASE: TorchScript (.pt) or a compiled AOTInductor package (.pt2)")
    p.add_argument("checkpoint", help="checkpoint written by training or JanusPotential.save")
    p.add_argument("-o", "--output", default="model.pt", help="output file (default: model.pt)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--format", choices=["torchscript", "aoti"], default="torchscript",
                   help="torchscript (default) or aoti (an AOTInductor package, name it .pt2; CPU): both run in "
                        "ASE and LAMMPS on any rank count")
    p.add_argument("--head", help="output head of a multi-head (multi-fidelity) model to export (default: its first)")
    p.set_defaults(handler=_export)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print the elements, metadata and parameter counts of a model file or checkpoint")
    p.add_argument("model", help="exported model.pt, model checkpoint or training checkpoint (EMA weights)")
    p.set_defaults(handler=_info)


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="janus", description="Janus machine-learning interatomic potential")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    _add_info(sub)
    return parser, sub


def run(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; bad input ends with a one-line error and exit status 2."""
    try:
        return int(args.handler(args) or 0)
    except JanusInputError as exc:
        print(f"janus: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser, _ = build_parser()
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
