"""`ParallelJanusCalculator`: one large periodic structure evaluated by all MPI ranks.

Under `mpirun -np N`, every rank holds the same `ase.Atoms` (as ASE's MPI scripts do);
each evaluates the model on its slab domain with the halo protocol of DESIGN.md
(`janus_potential.parallel.DomainModel`), and the owned energies and forces are summed
over ranks, so every rank ends with the full results, equal to the one-process
`JanusCalculator`. One process (no launcher) uses the periodic self-image backend.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from janus_potential.errors import JanusInputError
from janus_potential.graph import build_graph
from janus_potential.io import load_for_inference
from janus_potential.parallel.domain import DomainModel
from janus_potential.parallel.mesh import init_distributed


class ParallelJanusCalculator(Calculator):
    """Energy, forces, stress and per-atom energies of a fully periodic structure, split
    spatially over the ranks of `group` (default: every launched rank)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model: Any, group: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        loaded = load_for_inference(model)
        self.module, self.cutoff, self.supported_elements, self.dtype = (loaded.module, loaded.cutoff,
                                                                         loaded.elements, loaded.dtype)
        init_distributed()
        self.group = group

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if not np.all(atoms.get_pbc()):
            raise JanusInputError("the parallel calculator needs a fully periodic structure")
        graph = build_graph(atoms, self.cutoff, self.supported_elements, dtype=self.dtype)
        domain_model = DomainModel.build(self.module, graph, self.group)
        with torch.enable_grad():
            out = domain_model(graph.positions, graph.cell[0], compute_virial=True)
        n = len(atoms)
        gathered = torch.zeros(n, 4, dtype=torch.float64)
        owned = domain_model.domain.owned
        gathered[owned, :3] = out["forces"].detach().to(torch.float64)
        gathered[owned, 3] = out["atom_energies"].detach().to(torch.float64)
        if dist.is_initialized() and dist.get_world_size(domain_model.group) > 1:
            dist.all_reduce(gathered, group=domain_model.group)
        energy = float(out["energy"].detach())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = gathered[:, :3].numpy()
        self.results["energies"] = gathered[:, 3].numpy()
        self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"].detach().to(torch.float64).numpy())
