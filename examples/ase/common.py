"""Shared by the ASE examples: the `--model` option, the crystal options, the model's elements.

Every example takes `--model PATH`, anything `JanusCalculator` reads: an exported file
(`janus export … -o model.pt`), a model checkpoint (`JanusPotential.save`) or a training
checkpoint (its EMA weights). The crystal comes from `ase.build.bulk(formula, lattice, a=…)`,
repeated and optionally rattled.
"""

from __future__ import annotations

import argparse

from ase import Atoms
from ase.build import bulk
from ase.data import chemical_symbols

from janus_potential.ase import JanusCalculator


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="model.pt",
                        help="exported model file (janus export), model or training checkpoint (default: model.pt)")


def add_crystal_arguments(parser: argparse.ArgumentParser, formula: str, lattice: str, a: float,
                          repeat: int | None = 1, rattle: float | None = None) -> None:
    """Options of `build_crystal`; `repeat=None` / `rattle=None` leave those options out."""
    group = parser.add_argument_group("crystal (ase.build.bulk)")
    group.add_argument("--formula", default=formula, help=f"chemical formula (default: {formula})")
    group.add_argument("--lattice", default=lattice,
                       help=f"fcc, bcc, diamond, rocksalt, zincblende, fluorite, … (default: {lattice})")
    group.add_argument("-a", type=float, default=a, help=f"lattice constant in Angstrom (default: {a})")
    if repeat is not None:
        group.add_argument("--repeat", type=int, default=repeat,
                           help=f"repeat the conventional cubic cell N times per direction (default: {repeat})")
    if rattle is not None:
        group.add_argument("--rattle", type=float, default=rattle,
                           help=f"random displacement of every atom, standard deviation in A (default: {rattle})")
        group.add_argument("--seed", type=int, default=0, help="random seed of --rattle (default: 0)")


def build_crystal(args: argparse.Namespace, cubic: bool = True) -> Atoms:
    """The crystal of the `add_crystal_arguments` options (the conventional cell when `cubic`)."""
    atoms = bulk(args.formula, args.lattice, a=args.a, cubic=cubic).repeat(getattr(args, "repeat", 1))
    if getattr(args, "rattle", 0.0) > 0.0:
        atoms.rattle(stdev=args.rattle, seed=args.seed)
    return atoms


def model_elements(path: str) -> tuple[list[str], float]:
    """(element symbols in atomic-number order, cutoff in A) of the model in `path`."""
    calculator = JanusCalculator(path)
    return [chemical_symbols[z] for z in calculator.supported_elements], calculator.cutoff
