"""The process mesh `world = dp x ep x dd` (DESIGN.md, parallel mesh).

`init_distributed()` starts `torch.distributed` from whatever launched us: `torchrun`
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment), `mpirun` (ranks from
mpi4py; rank 0 picks a free port and broadcasts it) or nothing (one process, no process
group). `ProcessMesh(dp, ep, dd)` then builds the groups once. Rank layout, dd fastest:

    rank = (dp_index * ep + ep_index) * dd + dd_index

- dd group: ranks sharing (dp_index, ep_index): they split one structure spatially.
- ep group: ranks sharing (dp_index, dd_index): they shard the experts.
- dp group: ranks sharing (ep_index, dd_index): they hold the same parameter shards.
- grad groups: dense parameters are summed over the whole world, expert shards over the
  ranks holding the same shard (same ep_index). Separate groups from the halo/dispatch
  ones, so asynchronous gradient reductions never interleave with those collectives.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..errors import JanusInputError

MPI_ENVIRONMENT = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID", "PMIX_RANK")


class MeshError(JanusInputError):
    """A parallel layout that does not fit the launched processes."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _host_address() -> str:
    """This host's address as the other nodes of a job reach it (its name resolved; the
    loopback address when the name does not resolve: a one-node job)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in MPI_ENVIRONMENT)


LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                        "PMI_LOCAL_RANK", "SLURM_LOCALID")


def _node_value(variables: tuple, what: str, default: int) -> int:
    """The first launcher variable of `variables` that holds a number, else `what` ("rank"
    or "size") of an MPI shared-memory split of the world under mpirun, else `default`."""
    for name in variables:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    if launched_by_mpi():
        try:
            from mpi4py import MPI
        except ImportError:
            return default
        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        return node.Get_rank() if what == "rank" else node.Get_size()
    return default


def local_rank() -> int:
    """This process's rank among the processes of its node: from the launcher's variables
    (torchrun's LOCAL_RANK, Open MPI, MPICH/Hydra, MVAPICH, Slurm), else from an MPI
    shared-memory split of the world under mpirun, else 0."""
    return _node_value(LOCAL_RANK_VARIABLES, "rank", 0)


LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE",
                        "PMI_LOCAL_SIZE")


def local_world_size() -> int:
    """How many processes of this job run on this node (launcher variables as in
    `local_rank`, else an MPI shared-memory split under mpirun, else 1)."""
    return _node_value(LOCAL_SIZE_VARIABLES, "size", 1)


def backend_for(device: Optional[torch.device]) -> str:
    """gloo for CPU runs; for CUDA runs "cpu:gloo,cuda:nccl" (each collective goes to the
    backend of its tensors' device: NCCL for model tensors, gloo for CPU bookkeeping).

    When a node runs more ranks than it has GPUs, ranks share a GPU, and NCCL refuses two
    ranks of one communicator on one device ("Duplicate GPU detected"): then gloo serves
    the CUDA tensors too (its collectives copy them through host memory; the halo and the
    expert all-to-all stage them there themselves, `parallel.halo.backend_handles`).
    JANUS_DIST_BACKEND overrides the choice (any torch.distributed backend string)."""
    if os.environ.get("JANUS_DIST_BACKEND"):
        return os.environ["JANUS_DIST_BACKEND"]
    if device is not None and torch.device(device).type == "cuda":
        if local_world_size() > max(torch.cuda.device_count(), 1):
            return "gloo"
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_distributed(backend: Optional[str] = None, device: Optional[torch.device] = None) -> tuple[int, int]:
    """Initialise the default process group from the launcher; returns (rank, world size).

    Idempotent; one process without a launcher stays uninitialised and returns (0, 1). The
    backend follows `device` (`backend_for`) unless `backend` is given; a CUDA `device` is
    made the current device first. Under mpirun without MASTER_ADDR, rank 0 broadcasts its
    own address and a free port (never a hard-coded localhost, so a multi-node launch can
    meet).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend or backend_for(device)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world == 1:
            return 0, 1
        dist.init_process_group(backend, rank=rank, world_size=world)
        return rank, world
    if not launched_by_mpi():
        return 0, 1
    from janus_potential.extras import require

    require("mpi", "a launch under mpirun", "mpi4py")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if world == 1:
        return 0, 1
    address, port = comm.bcast((os.environ.get("MASTER_ADDR") or _host_address(), _free_port()) if rank == 0
                               else None, root=0)
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=rank, world_size=world)
    return rank, world


@dataclass
class ProcessMesh:
    """Groups of a dp x ep x dd layout; all None on one process."""

    dp: int = 1
    ep: int = 1
    dd: int = 1
    rank: int = 0
    world_size: int = 1
    dp_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    dd_group: Optional[dist.ProcessGroup] = None
    dense_grad_group: Optional[dist.ProcessGroup] = None
    expert_grad_group: Optional[dist.ProcessGroup] = None

    @property
    def dp_index(self) -> int:
        return self.rank // (self.ep * self.dd)

    @property
    def ep_index(self) -> int:
        return (self.rank // self.dd) % self.ep

    @property
    def dd_index(self) -> int:
        return self.rank % self.dd

    @classmethod
    def create(cls, dp: int = 1, ep: int = 1, dd: int = 1, device: Optional[torch.device] = None) -> "ProcessMesh":
        """Initialise torch.distributed if needed (backend from `device`) and build every
        group (collective)."""
        rank, world = init_distributed(device=device)
        if min(dp, ep, dd) < 1:
            raise MeshError(f"parallel sizes must be positive, got dp={dp} ep={ep} dd={dd}")
        if dp * ep * dd != world:
            raise MeshError(
                f"parallel layout dp={dp} x ep={ep} x dd={dd} = {dp * ep * dd} does not match the "
                f"{world} launched process(es); set parallel.dp/ep/dd so that they multiply to {world}"
            )
        mesh = cls(dp=dp, ep=ep, dd=dd, rank=rank, world_size=world)
        if world == 1:
            return mesh
        coords = [((r // (ep * dd)), (r // dd) % ep, r % dd) for r in range(world)]

        def groups_by(key) -> Dict[tuple, dist.ProcessGroup]:
            members: Dict[tuple, List[int]] = {}
            for r, c in enumerate(coords):
                members.setdefault(key(c), []).append(r)
            return {k: dist.new_group(v) for k, v in sorted(members.items())}

        mine = coords[rank]
        mesh.dd_group = groups_by(lambda c: (c[0], c[1]))[(mine[0], mine[1])]
        mesh.ep_group = groups_by(lambda c: (c[0], c[2]))[(mine[0], mine[2])]
        mesh.dp_group = groups_by(lambda c: (c[1], c[2]))[(mine[1], mine[2])]
        mesh.dense_grad_group = dist.new_group(list(range(world)))
        mesh.expert_grad_group = groups_by(lambda c: (c[1],))[(mine[1],)]
        return mesh
