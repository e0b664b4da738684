"""Hybrid-parallel building blocks: process mesh, halo exchange, domain decomposition,
expert parallelism (see docs/parallel.md)."""

from .domain import Domain, DomainModel, decompose, halo_plan
from .halo import HaloPlan, all_reduce_sum, halo_exchange, halo_reverse

__all__ = ["Domain", "DomainModel", "HaloPlan", "all_reduce_sum", "decompose", "halo_exchange", "halo_plan",
           "halo_reverse"]
