"""Parallel degrees, their validation against the world size and the model, and the device mesh.

`ParallelDims` is pure arithmetic (no process group needed), so a layout that cannot work fails at
start-up, before any model is built, with a message naming the numbers. `build_mesh()` then creates
one named `DeviceMesh` ("pp", "dp", "cp", "tp", outermost first: TP neighbours share a node) and
hands out the process groups each plan needs; nothing is stored in module globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megaqwen.suggest import check_choice

MESH_DIMS = ("pp", "dp", "cp", "tp")
BACKENDS = ("auto", "nccl", "gloo")
"""`parallel.backend` values: auto picks nccl when CUDA is present, gloo otherwise."""


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that holds `vocab_size` rows."""
    return -(-vocab_size // multiple) * multiple


@dataclass
class ParallelDims:
    world_size: int
    """Number of processes (torchrun's WORLD_SIZE)."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    cp: int = 1
    """Context-parallel degree."""
    ep: int = 1
    """Expert-parallel degree; experts are spread over ranks carved out of dp x cp."""
    dp: int = -1
    """Data-parallel degree; -1 infers world_size / (tp * pp * cp)."""
    etp: int = -1
    """MoE expert tensor-parallel degree (`ParallelConfig.etp`): -1 = tp, 0 = experts whole per tp rank."""

    @property
    def expert_parts(self) -> int:
        """Parts a tp group's tokens are cut into for expert dispatch (tp/etp; 1 when etp is 0 or tp)."""
        return self.tp // self.etp if self.etp > 0 else 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        model_parallel = self.tp * self.pp * self.cp
        if self.dp == -1:
            if self.world_size % model_parallel:
                raise ValueError(
                    f"world_size={self.world_size} is not divisible by tp*pp*cp="
                    f"{self.tp}*{self.pp}*{self.cp}={model_parallel}; cannot infer dp")
            self.dp = self.world_size // model_parallel
        if self.dp < 1:
            raise ValueError(f"parallel.dp must be >= 1 or -1 (infer), got {self.dp}")
        if self.dp * model_parallel != self.world_size:
            raise ValueError(
                f"dp*tp*pp*cp = {self.dp}*{self.tp}*{self.pp}*{self.cp} = {self.dp * model_parallel} "
                f"!= world_size={self.world_size}")
        if self.etp == -1:
            self.etp = self.tp
        if self.etp not in (0, 1, self.tp):  # 1 < etp < tp: checkpoints describe shards over all of tp
            raise ValueError(f"parallel.etp={self.etp} must be -1 or tp={self.tp} (expert TP over the tp "
                             "group), 1 (sequence-parallel dispatch) or 0 (experts whole on every tp rank)")
        if (self.dp * self.cp * self.expert_parts) % self.ep:
            raise ValueError(f"ep={self.ep} must divide dp*cp*tp/etp={self.dp}*{self.cp}*{self.expert_parts}"
                             f"={self.dp * self.cp * self.expert_parts} (expert-parallel ranks are carved "
                             "out of the data-parallel ranks and the tp parts of parallel.etp < tp)"
                             if self.expert_parts > 1 else
                             f"ep={self.ep} must divide dp*cp={self.dp}*{self.cp}={self.dp * self.cp} "
                             "(expert-parallel ranks are carved out of the data-parallel ranks)")

    @classmethod
    def from_config(cls, cfg: Any, world_size: int) -> ParallelDims:
        """From a `ParallelConfig` (or anything with tp/pp/cp/ep/dp attributes)."""
        return cls(world_size=world_size, tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, ep=cfg.ep, dp=cfg.dp,
                   etp=getattr(cfg, "etp", -1))

    def kv_replicas(self, num_kv_heads: int) -> int:
        """How many TP ranks hold each KV head (1 unless tp > num_kv_heads)."""
        return max(1, self.tp // num_kv_heads)

    def validate_model(self, cfg: Any, spec: Any, seq_len: int | None = None,
                       sequence_parallel: bool = False) -> None:
        """Check that the model (a config of the architecture `spec`, a `ModelSpec`, describes) can be
        split this way: the spec's own rules (`spec.validate`: heads, vocabulary, experts...), then
        the generic ones (experts to spread over ep, layers for pp, the sequence over tp and cp).
        Raises one ValueError naming the layout, the model and every offending value."""
        name = getattr(cfg, "name", "model")
        errors = list(spec.validate(cfg, self))
        tp = self.tp
        if self.ep > 1 and not spec.expert_parallel:
            errors.append(f"ep={self.ep} needs an MoE model (arch {spec.arch!r} has no routed experts); "
                          "use ep=1")
        if cfg.num_layers < self.pp:  # how they split is the pipeline plan's check (pp_layers)
            errors.append(f"num_layers={cfg.num_layers} is fewer than pp={self.pp} pipeline ranks")
        if seq_len is not None:
            if sequence_parallel and seq_len % tp:
                errors.append(f"seq_len={seq_len} is not divisible by tp={tp} (sequence parallelism "
                              "shards activations on the sequence axis)")
            if self.cp > 1 and seq_len % (2 * self.cp):
                errors.append(f"seq_len={seq_len} is not divisible by 2*cp={2 * self.cp}")
        if errors:
            raise ValueError(f"parallel layout tp={tp} pp={self.pp} cp={self.cp} ep={self.ep} "
                             f"dp={self.dp} does not fit model {name!r}: " + "; ".join(errors))

    def build_mesh(self, device_type: str | None = None) -> ParallelMesh:
        """Create the named mesh over the default process group (collective: every rank calls it)."""
        if not dist.is_initialized():
            raise RuntimeError("build_mesh() needs torch.distributed initialised (see parallel.setup)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims.world_size={self.world_size} but the process group has "
                             f"{dist.get_world_size()} ranks")
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        shape = (self.pp, self.dp, self.cp, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        return ParallelMesh(dims=self, mesh=mesh)


@dataclass
class ParallelMesh:
    """The built mesh and the groups plans take; plans receive these explicitly."""

    dims: ParallelDims
    """The degrees this mesh was built from."""
    mesh: DeviceMesh
    """4-D mesh with dims ("pp", "dp", "cp", "tp")."""
    _subgroups: dict[tuple[str, int], dist.ProcessGroup | None] = field(default_factory=dict, repr=False)
    """Cache of TP subgroups made by `tp_subgroup`."""

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)

    def rank(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.group("tp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.group("dp")

    @property
    def tp_rank(self) -> int:
        return self.rank("tp")

    @property
    def dp_rank(self) -> int:
        return self.rank("dp")

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    def tp_subgroup(self, size: int, strided: bool = False) -> dist.ProcessGroup | None:
        """This rank's group among its TP ranks cut into blocks of `size` consecutive ranks (KV-head
        replicas), or with `strided`, the ranks at the same position in every block.

        Collective: every rank creates every such group in the same order, as `new_group` requires.
        """
        key = ("tp_strided" if strided else "tp", size)
        if key not in self._subgroups:
            tp = self.dims.tp
            if tp % size:
                raise ValueError(f"TP subgroup size {size} does not divide tp={tp}")
            mine = None
            for tp_ranks in self.mesh.mesh.reshape(-1, tp).tolist():  # tp is the innermost mesh dim
                blocks = ([tp_ranks[j::size] for j in range(size)] if strided
                          else [tp_ranks[i:i + size] for i in range(0, tp, size)])
                for ranks in blocks:
                    g = dist.new_group(ranks)
                    if dist.get_rank() in ranks:
                        mine = g
            self._subgroups[key] = mine
        return self._subgroups[key]


def resolve_backend(backend: str) -> str:
    """`auto` -> nccl when CUDA is present, gloo otherwise."""
    check_choice("parallel.backend", backend, BACKENDS)
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend=nccl needs CUDA; use gloo (or auto) on CPU")
    return backend
