"""ASE front end of Janus: `from janus_potential.ase import JanusCalculator`."""

from .calculator import JanusCalculator

__all__ = ["JanusCalculator"]
