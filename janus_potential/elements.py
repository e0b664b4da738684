"""Chemical element symbols and atomic numbers (Z = 1..100) covered by Janus."""

from __future__ import annotations

from ase.data import atomic_numbers, chemical_symbols

MAX_ATOMIC_NUMBER = 100


def symbol_to_number(symbol: str) -> int:
    """Atomic number of an element symbol, with a clear error for unknown symbols."""
    if symbol not in atomic_numbers or atomic_numbers[symbol] == 0:
        raise ValueError(f"unknown chemical element symbol {symbol!r}")
    return int(atomic_numbers[symbol])


def number_to_symbol(number: int) -> str:
    """Element symbol of an atomic number."""
    if not 1 <= number < len(chemical_symbols):
        raise ValueError(f"no chemical element has atomic number {number}")
    return chemical_symbols[number]
