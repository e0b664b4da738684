"""Chemical element symbols and atomic numbers (Z = 1..100) covered by Janus."""

from __future__ import annotations

import math

import torch
from ase.data import atomic_masses, atomic_numbers, chemical_symbols, covalent_radii

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


# Pauling electronegativities (CRC Handbook / WebElements values; Pm, At, Rn and the heavy
# actinides are the usual estimates); None where none is defined (He, Ne, Ar).
PAULING_ELECTRONEGATIVITY = [
    None, 2.20, None,                                                               # -, H, He
    0.98, 1.57, 2.04, 2.55, 3.04, 3.44, 3.98, None,                                 # Li-Ne
    0.93, 1.31, 1.61, 1.90, 2.19, 2.58, 3.16, None,                                 # Na-Ar
    0.82, 1.00, 1.36, 1.54, 1.63, 1.66, 1.55, 1.83, 1.88, 1.91, 1.90, 1.65,         # K-Zn
    1.81, 2.01, 2.18, 2.55, 2.96, 3.00,                                             # Ga-Kr
    0.82, 0.95, 1.22, 1.33, 1.60, 2.16, 1.90, 2.20, 2.28, 2.20, 1.93, 1.69,         # Rb-Cd
    1.78, 1.96, 2.05, 2.10, 2.66, 2.60,                                             # In-Xe
    0.79, 0.89, 1.10, 1.12, 1.13, 1.14, 1.13, 1.17, 1.20, 1.20, 1.20, 1.22, 1.23,   # Cs-Ho
    1.24, 1.25, 1.10, 1.27, 1.30, 1.50, 2.36, 1.90, 2.20, 2.20, 2.28, 2.54, 2.00,   # Er-Hg
    1.62, 2.33, 2.02, 2.00, 2.20, 2.20,                                             # Tl-Rn
    0.70, 0.90, 1.10, 1.30, 1.50, 1.38, 1.36, 1.28, 1.13, 1.28, 1.30, 1.30, 1.30,   # Fr-Es
    1.30,                                                                           # Fm
]
PERIOD_STARTS = (1, 3, 11, 19, 37, 55, 87)  # first atomic number of periods 1..7


def period_group_block(number: int) -> tuple[int, int, str]:
    """Period (1..7), group (1..18; the lanthanides and actinides count as group 3) and block
    (s, p, d, f) of an element, from its atomic number."""
    if not 1 <= number <= 118:
        raise ValueError(f"no chemical element has atomic number {number}")
    period = sum(number >= start for start in PERIOD_STARTS)
    position = number - PERIOD_STARTS[period - 1]  # 0-based position in its period
    if period == 1:
        return period, (1 if number == 1 else 18), "s"
    if period <= 3:  # 8 elements: groups 1, 2, 13..18
        return period, (position + 1 if position < 2 else position + 11), ("s" if position < 2 else "p")
    if period <= 5:  # 18 elements
        block = "s" if position < 2 else ("d" if position < 12 else "p")
        return period, position + 1, block
    # periods 6 and 7: 32 elements, the 14 f-block elements after group 2 (La/Ac start group 3)
    if position < 2:
        return period, position + 1, "s"
    if position < 17:  # La..Lu, Ac..Lr: f block (La, Ac, Lu and Lr included, as often tabulated)
        return period, 3, "f"
    return period, position - 13, ("d" if position < 26 else "p")


def element_descriptors(max_atomic_number: int = MAX_ATOMIC_NUMBER) -> torch.Tensor:
    """Fixed chemical descriptors of the elements, one row per atomic number 0..max (row 0 is
    zero): one-hot period (7), group (18) and block (4); the position in the f series (0..1);
    and, standardised over the elements, the Pauling electronegativity (its mean where none is
    defined, with a flag), the covalent radius, the logarithm of the atomic mass and the
    valence-electron count. The model's `element_features` option maps them to the embedding
    (nn/embedding.py), so that elements seen in few frames share with their chemical neighbours."""
    rows, continuous = [], []
    for number in range(1, max_atomic_number + 1):
        period, group, block = period_group_block(number)
        one_hot = [0.0] * (7 + 18 + 4)
        one_hot[period - 1] = 1.0
        one_hot[7 + group - 1] = 1.0
        one_hot[25 + "spdf".index(block)] = 1.0
        f_position = ((number - 57) if period == 6 else (number - 89)) / 14.0 if block == "f" else 0.0
        chi = PAULING_ELECTRONEGATIVITY[number] if number < len(PAULING_ELECTRONEGATIVITY) else None
        valence = group if group <= 2 else (group - 10 if group >= 13 else group)
        rows.append(one_hot + [f_position, 1.0 if chi is None else 0.0])
        continuous.append([chi, float(covalent_radii[number]), math.log(float(atomic_masses[number])), float(valence)])
    values = torch.tensor([[float("nan") if v is None else v for v in row] for row in continuous], dtype=torch.float64)
    mean = torch.nanmean(values, dim=0)
    values = torch.where(torch.isnan(values), mean.expand_as(values), values)
    values = (values - mean) / values.std(dim=0)
    table = torch.cat([torch.tensor(rows, dtype=torch.float64), values], dim=1)
    return torch.cat([torch.zeros(1, table.shape[1], dtype=torch.float64), table])
