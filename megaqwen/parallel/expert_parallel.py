"""Expert parallelism: MoE experts spread over an `ep` group carved out of the data-parallel ranks.

Layout ("parallel folding": the experts' mesh is cut from the attention mesh's ranks). Per pipeline
stage the dp*cp*tp ranks (mesh order, tp innermost) form an (edp, ep, etp) grid, etp = parallel.etp:
an *ep group* (ranks along ep) shares its tokens' experts, rank j of it holds experts
[j*E/ep, (j+1)*E/ep) of every sparse layer; an *etp group* (along etp, inside one tp group) holds
slices of the same experts' intermediate dim (`expert_tensor_parallel`); the *expert-data-parallel*
(edp) group holds identical pieces and sums their gradients. With etp = tp (the default) the ep
groups are blocks of ep dp*cp ranks at one tp coordinate; with etp < tp each tp group's rows are cut
into tp/etp parts dispatched separately (sequence-parallel dispatch) and ep may span tp ranks.
etp = 0 keeps the old layout: experts whole on every tp rank, each computing all the rows (tp-fold
repeated expert work; for comparison). Attention, router and shared expert stay replicated over the
dp*cp ranks (DDP/FSDP as usual).

Parameter names never change (`model.layers.3.mlp.experts.5.up_proj.weight` lives on the ranks
holding expert 5), so initialisation per name equals one process and DCP checkpoints load into any
ep. Non-local experts are deleted on the meta model, before anything is allocated.

Forward of one sparse layer (A assignments here, sorted by expert, counts per expert):
    counts all-to-all      every rank learns how many rows it receives per (source, local expert)
    dispatch all-to-all    rows to the ranks holding their experts (uneven splits)
    regroup                source-major -> local-expert-major, local experts run, regroup back
    combine all-to-all     outputs back to the rows' source ranks (the reverse splits)
Both token all-to-alls are autograd functions whose backward is the reverse all-to-all.

Gradients. An expert's grad on its rank sums the contributions of the ep group's tokens, each
rank's loss already scaled as DDP expects (it averages over D): the full grad is the sum over edp
replicas divided by D (`reduce_expert_grads`). Expert params are kept out of DDP
(`ddp_ignore_experts`) and out of the dense grad norm (`clip_grad_norm_ep_`). FSDP2 shards them
over the edp mesh with gradient divide factor D (`apply_fsdp_experts`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from megaqwen.parallel.collectives import copy_to_tp, gather_from_sp_split_grad, reduce_from_tp, split_to_sp
from megaqwen.parallel.dims import ParallelMesh
from megaqwen.parallel.shards import ShardMap


@dataclass
class EPGroups:
    ep: int
    """Expert-parallel degree."""
    ep_group: dist.ProcessGroup
    """This rank's ep block: tokens are exchanged here."""
    edp_group: dist.ProcessGroup
    """Ranks holding the same experts (and expert-TP slice) as this one: expert grads summed here."""
    ep_rank: int
    """Position in the ep block: this rank holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep)."""
    dp_world: int
    """dp*cp: the ranks DDP/FSDP average dense gradients over."""
    etp: int = 0
    """Expert tensor-parallel degree (`megaqwen.parallel.expert_tensor_parallel`): 0 experts whole
    on every tp rank (each computing all the tp group's rows, the layout before issue 24), k >= 1
    each expert's intermediate dim over k tp ranks and the tp group's rows cut into tp/k parts."""
    etp_group: dist.ProcessGroup | None = None
    """The etp ranks sharing one part of the rows and slicing the same experts (None: etp <= 1)."""
    part_group: dist.ProcessGroup | None = None
    """The tp/etp ranks of this tp group that each take another part of its rows (None: one part)."""
    tp: int = 1
    """Tensor-parallel degree of the attention mesh."""

    @property
    def parts(self) -> int:
        """Parts the tp group's (replicated) rows are cut into before dispatch."""
        return self.tp // self.etp if self.etp else 1

    @property
    def edp(self) -> int:
        return self.dp_world * self.parts // self.ep

    def expert_tp_copies(self, tp_copies: int) -> int:
        """TP ranks holding the same values as this rank's piece of an expert tensor, given what the
        ShardMap says (`tp_copies`: it knows the expert-TP slices; folded experts, whole but different
        on each tp part, it would count tp times)."""
        return 1 if self.parts > 1 else tp_copies


def resolve_etp(etp: int, tp: int) -> int:
    """parallel.etp as used: -1 means tp; 0 (replicate) and divisors of tp as given."""
    if etp == -1:
        return tp
    if etp not in (0, 1, tp):
        raise ValueError(f"parallel.etp={etp} must be -1 or tp={tp} (expert TP over the tp group), 1 "
                         "(sequence-parallel dispatch) or 0 (experts whole on every tp rank)")
    return etp


def ep_groups(mesh: ParallelMesh, ep: int, etp: int = -1) -> EPGroups:
    """This rank's ep, edp (and expert-TP) groups. Per pipeline stage the dp*cp*tp ranks, in mesh
    order (tp innermost), are viewed as an (edp, ep, etp') grid with etp' = etp (tp in replicate
    mode): the experts' own mesh over the attention mesh's ranks ("parallel folding"). Collective:
    every rank creates every group in the same order (as `dist.new_group` requires)."""
    d = mesh.dims
    etp = resolve_etp(etp, d.tp)
    dp_world, inner = d.dp * d.cp, etp or d.tp
    parts = d.tp // inner
    if (dp_world * parts) % ep:
        raise ValueError(f"ep={ep} must divide dp*cp*tp/etp={d.dp}*{d.cp}*{d.tp}/{inner}={dp_world * parts}")
    edp = dp_world * parts // ep
    grids = mesh.mesh.mesh.reshape(d.pp, edp, ep, inner)  # (pp, dp, cp, tp) flattened per stage
    me = dist.get_rank()
    ep_group = edp_group = None
    ep_rank = 0
    for grid in grids:
        for a in range(edp):
            for c in range(inner):
                ranks = grid[a, :, c].tolist()
                g = dist.new_group(ranks)
                if me in ranks:
                    ep_group, ep_rank = g, ranks.index(me)
    for grid in grids:
        for b in range(ep):
            for c in range(inner):
                ranks = grid[:, b, c].tolist()
                g = dist.new_group(ranks)
                if me in ranks:
                    edp_group = g
    etp_group = part_group = None
    if etp > 1:
        etp_group = mesh.tp_group if etp == d.tp else mesh.tp_subgroup(etp)
    if etp and parts > 1:
        part_group = mesh.tp_subgroup(etp, strided=True)
    return EPGroups(ep, ep_group, edp_group, ep_rank, dp_world, etp, etp_group, part_group, d.tp)


class _AllToAll(torch.autograd.Function):
    """All-to-all with uneven splits forward / the reverse all-to-all backward."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Rows x[sum(in_splits[:r]) : ...] go to rank r; rank r's rows for us land in block r of the
    output (out_splits[r] rows). Autograd: the grads travel back the same way."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatcher:
    """A `SparseMoeBlock.dispatcher`: sends expert-sorted rows to the ep ranks holding their experts
    and brings the outputs back in the input order; with expert TP (`etp_group`) the experts here are
    slices of their intermediate dim, whose partial outputs are summed over the etp group; with a
    `part_group` this rank first keeps its part of the rows (which the tp group holds replicated)
    and the parts' outputs are all-gathered after (sequence-parallel dispatch).

    Counters (forward, what this rank did): `a2a_bytes` sent to other ranks by the two token
    all-to-alls, `rows` it computed. The expert FLOPs are counted by the block's `compute`."""

    def __init__(self, group: dist.ProcessGroup | None, experts: int,
                 etp_group: dist.ProcessGroup | None = None, part_group: dist.ProcessGroup | None = None):
        self.group = group
        self.ep = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.experts = experts
        self.local = experts // self.ep  # a block's experts (all ranks together) / ep
        self.etp_group, self.part_group = etp_group, part_group
        self.parts = dist.get_world_size(part_group) if part_group is not None else 1
        self.a2a_bytes = 0
        self.rows = 0

    def __call__(self, x_AH: torch.Tensor, counts_E: torch.Tensor, compute) -> torch.Tensor:
        a = x_AH.shape[0]
        if self.parts > 1:
            x_AH, counts_E = self._my_part(x_AH, counts_E)
        x_AH = copy_to_tp(x_AH, self.etp_group)  # etp ranks: same rows, their slice of every expert
        y = self._exchange(x_AH, counts_E, compute) if self.ep > 1 else compute(x_AH, counts_E)
        y = reduce_from_tp(y, self.etp_group)  # down_proj is row-parallel: partial sums
        if self.parts > 1:
            y = gather_from_sp_split_grad(y, self.part_group, dim=0)[:a]
        return y

    def _my_part(self, x_AH: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's chunk of the expert-sorted rows (the tp group holds them all; zero rows pad the
        last expert's block to a multiple of the parts) and its per-expert counts."""
        a, p = x_AH.shape[0], self.parts
        pad = -a % p
        if pad:
            x_AH = torch.cat([x_AH, x_AH.new_zeros(pad, x_AH.shape[1])])
            counts_E = counts_E.clone()
            counts_E[-1] += pad
        expert_A = torch.repeat_interleave(torch.arange(self.experts, device=counts_E.device), counts_E)
        r, chunk = dist.get_rank(self.part_group), (a + pad) // p
        counts_E = torch.bincount(expert_A[r * chunk:(r + 1) * chunk], minlength=self.experts)
        return split_to_sp(x_AH, self.part_group, dim=0), counts_E

    def _exchange(self, x_AH: torch.Tensor, counts_E: torch.Tensor, compute) -> torch.Tensor:
        ep, el = self.ep, self.local
        recv = torch.empty_like(counts_E)
        dist.all_to_all_single(recv, counts_E.contiguous(), group=self.group)  # E/ep counts per rank
        recv_SL = recv.view(ep, el)  # rows from source s for local expert l
        send = counts_E.view(ep, el).sum(1).tolist()
        got = recv_SL.sum(1).tolist()
        row_bytes = x_AH.shape[1] * x_AH.element_size()
        self.a2a_bytes += (sum(send) - send[self.rank] + sum(got) - got[self.rank]) * row_bytes
        x_R = all_to_all(x_AH, got, send, self.group)  # (R, H), source-major
        local_ids = torch.arange(el, device=x_R.device).repeat(ep)
        expert_R = torch.repeat_interleave(local_ids, recv_SL.reshape(-1))
        perm = torch.argsort(expert_R, stable=True)  # -> local-expert-major
        self.rows += x_R.shape[0]
        y = compute(x_R.index_select(0, perm), recv_SL.sum(0))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return all_to_all(y.index_select(0, inv), send, got, self.group)


def _moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> module, for every module with `experts` (a ModuleDict keyed by global expert index)
    and a `dispatcher` slot: the protocol a model's MoE block follows (no model class named here)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "experts", None), nn.ModuleDict) and hasattr(m, "dispatcher")}


def apply_expert_parallel(model: nn.Module, groups: EPGroups | dist.ProcessGroup,
                          shards: ShardMap | None = None) -> set[str]:
    """Keep only this rank's experts (best on the meta model, before materialising) and route tokens
    to them with all-to-all (and expert TP, `EPGroups.etp`). Returns the FQNs of the expert
    parameters this rank holds (at ep=1 too: they are what `reduce_expert_grads` and the grad norm
    treat apart); drops the deleted experts' expert-TP records from `shards`. Raises ValueError
    before changing anything when the experts do not split evenly."""
    group = groups.ep_group if isinstance(groups, EPGroups) else groups
    etp_group = groups.etp_group if isinstance(groups, EPGroups) else None
    part_group = groups.part_group if isinstance(groups, EPGroups) else None
    ep, r = dist.get_world_size(group), dist.get_rank(group)
    blocks = _moe_blocks(model)
    for name, block in blocks.items():
        if len(block.experts) % ep:
            raise ValueError(f"{name}: {len(block.experts)} experts are not divisible by ep={ep}")
    fqns = set()
    for name, block in blocks.items():
        e = len(block.experts)
        mine = {str(i) for i in range(r * e // ep, (r + 1) * e // ep)}
        for key in [k for k in block.experts if k not in mine]:
            if shards is not None:
                for p, _ in block.experts[key].named_parameters():
                    shards.shards.pop(f"{name}.experts.{key}.{p}", None)
            del block.experts[key]
        if ep > 1 or etp_group is not None or part_group is not None:
            block.dispatcher = AllToAllDispatcher(group if ep > 1 else None, e, etp_group, part_group)
        fqns |= {f"{name}.experts.{p}" for p, _ in block.experts.named_parameters()}
    return fqns


def ddp_ignore_experts(model: nn.Module, expert_fqns: set[str]) -> None:
    """Before wrapping `model` in DDP: leave the expert params out of its all-reduce (they differ
    across the ep group; `reduce_expert_grads` averages them over the edp group instead)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, sorted(expert_fqns))


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, expert_fqns: set[str], groups: EPGroups,
                        bucket_elements: int = 25_000_000) -> None:
    """After the last micro-batch's backward, before the grad norm: grad <- sum over the edp group
    / (dp*cp), the average DDP takes of dense grads. Missing grads count as zeros. All-reduces go in
    flat buckets of at most `bucket_elements` (a copy of all expert grads at once would cost GBs at
    scale); with edp = 1 the grads are only divided, in place. Not for FSDP2 (it reduces them itself)."""
    params = [p for n, p in model.named_parameters() if n in expert_fqns]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if groups.edp == 1:
        for p in params:
            p.grad.div_(groups.dp_world)
        return
    bucket: list[torch.Tensor] = []
    for i, p in enumerate(params):
        bucket.append(p.grad)
        if i == len(params) - 1 or sum(g.numel() for g in bucket) + params[i + 1].numel() > bucket_elements:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=groups.edp_group)
            flat.div_(groups.dp_world)
            for g, r in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(r.view_as(g))
            bucket = []


def _expert_sq(named_params, expert_fqns: set[str], shards: ShardMap, groups: EPGroups) -> torch.Tensor:
    """This rank's share of the expert grads' squared norm (divided by the ranks holding a copy)."""
    sq = torch.zeros((), dtype=torch.float64)
    for fqn, p in named_params:
        if fqn not in expert_fqns or p.grad is None:
            continue
        g = p.grad
        local = g.to_local() if isinstance(g, DTensor) else g  # FSDP2: split over edp already
        copies = groups.expert_tp_copies(shards.tp_copies(fqn))
        copies *= 1 if isinstance(g, DTensor) else groups.edp
        norm = torch.linalg.vector_norm(local, dtype=torch.float32).double()
        sq = sq.to(local.device) + norm.square() / copies
    return sq


def clip_grad_norm_ep_(named_params, max_norm: float, shards: ShardMap, expert_fqns: set[str],
                       groups: EPGroups) -> torch.Tensor:
    """`grad_norm.clip_grad_norm_` for a model with expert parallelism: the dense params' norm as
    there, plus the expert grads counted once per edp group (not once per dp rank); returns the
    norm before clipping (fp32 scalar, equal on every rank)."""
    from megaqwen.parallel.grad_norm import grad_norm

    named_params = list(named_params)
    dense = grad_norm([(n, p) for n, p in named_params if n not in expert_fqns], shards)
    sq = _expert_sq(named_params, expert_fqns, shards, groups).to(dense.device)
    dist.all_reduce(sq)
    norm = (dense.double().square() + sq).sqrt().float()
    if max_norm > 0 and math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, p in named_params:
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                g.mul_(coef.to(g.device, g.dtype))
    return norm


def apply_fsdp_experts(model: nn.Module, mesh: ParallelMesh, groups: EPGroups,
                       mp_param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 for the expert modules over the edp mesh, before `apply_fsdp` wraps the layers over
    dp (x cp): each local expert is its own FSDP unit, gradients divided by dp*cp (not edp)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ranks = dist.get_process_group_ranks(groups.edp_group)
    edp_mesh = DeviceMesh.from_group(groups.edp_group, mesh.mesh.device_type, mesh=ranks,
                                     mesh_dim_names=("edp",))
    mp = MixedPrecisionPolicy(param_dtype=mp_param_dtype, reduce_dtype=torch.float32)
    for block in _moe_blocks(model).values():
        for expert in block.experts.values():
            fully_shard(expert, mesh=edp_mesh, mp_policy=mp)
            expert.set_gradient_divide_factor(float(groups.dp_world))
            if groups.edp > 1 and dist.get_backend(groups.edp_group) == "gloo":  # no PREMUL_SUM: sum, divide
                expert.set_force_sum_reduction_for_comms(True)


@dataclass
class LayerLoad:
    load_E: torch.Tensor
    """fp32 (E,): assignments each expert was chosen for (before capacity drops), summed over dp."""
    dropped: float
    """Assignments dropped by the capacity factor (0 when dropless)."""


@torch.no_grad()
def collect_load(model: nn.Module, dp_group: dist.ProcessGroup | None = None) -> dict[str, LayerLoad]:
    """Collective over `dp_group` (the dp x cp ranks; not tp, whose ranks count the same tokens):
    the per-layer load counted by the forwards since the last call, summed over the group, then
    the counters reset. Call once per optimizer step on every rank, after the step's backwards
    (all micro-batches). {} for a dense model."""
    blocks = {n: b for n, b in _moe_blocks(model).items() if getattr(b, "load_E", None) is not None}
    if not blocks:
        return {}
    dropped = [b.dropped if b.dropped is not None else torch.zeros((), device=b.load_E.device)
               for b in blocks.values()]
    stats = torch.cat([torch.stack([b.load_E.float() for b in blocks.values()]),
                       torch.stack(dropped).float()[:, None]], dim=1)  # (L, E + 1)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(stats, group=dp_group)
    for b in blocks.values():
        b.reset_stats()
    return {n: LayerLoad(row[:-1], float(row[-1])) for n, row in zip(blocks, stats.cpu())}


@torch.no_grad()
def update_routing_bias(model: nn.Module, loads: dict[str, LayerLoad], rate: float) -> None:
    """After `optimizer.step()`, with `collect_load`'s global counts (identical on every replica, so
    every rank applies the same step): each router's aux-free bias += rate * sign(mean - load)."""
    if rate <= 0:
        return
    blocks = _moe_blocks(model)
    for name, layer in loads.items():
        block = blocks[name]
        bias = getattr(block, "routing_bias", None)
        if not isinstance(bias, DTensor):
            block.update_routing_bias(layer.load_E, rate)
            continue
        # FSDP2 shards the bias too: step this rank's slice of it
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        load = layer.load_E.float()
        delta = rate * torch.sign(load.mean() - load)
        (n,), (off,) = compute_local_shape_and_global_offset(bias.shape, bias.device_mesh, bias.placements)
        local = bias.to_local()
        local[:n].add_(delta[off:off + n].to(local.device, local.dtype))


def expert_param_count(model: nn.Module, expert_fqns: Iterable[str]) -> int:
    """Elements of expert params held here (for the run log's per-rank memory line)."""
    names = set(expert_fqns)
    return sum(p.numel() for n, p in model.named_parameters() if n in names)
