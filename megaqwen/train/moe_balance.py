"""The step's routing counts for the load-balancing forms that need more than one forward's tokens.

`megaqwen.models.moe_balance` writes each form as linear in the router probabilities once the
expert counts f are fixed; here the trainer learns those counts before the step's first backward, by
a counting pre-pass: a no-grad forward of every micro-batch of the step (the same inputs, autocast,
cp shard and pipeline as the training forwards, so the same routing), the model's `aux_terms`
handing each forward's top-k choices to a `RoutingCounts` collector, then one all-reduce:

    global_batch  per layer, summed over the step's micro-batches and the dp x cp ranks (each
                  pipeline stage owns its layers: nothing crosses the pp group)
    micro_batch   per micro-batch, pooled over every sparse layer: summed over the cp shards and the
                  pipeline stages (HF's form under pp or cp)
    sequence      per micro-batch, layer and row: summed over the cp shards (under cp only)

The result (`BalanceStats`) is set on the model for the step's training forwards and removed after.
Cost: one extra forward without autograd per micro-batch (about a third of a step's compute; the
router counts of a step cannot be known earlier, and each micro-batch's backward needs them: Megatron
and Qwen instead use the counts seen so far, which makes the gradients of earlier micro-batches
approximate). Not run when the local counts are already the whole batch's (one micro-batch on one
dp x cp rank, or no cp / pp for the micro_batch and sequence forms) or when the loss is not trained
(router_aux_loss_coef 0, aux_free). The pre-pass's expert-load counts are not added to the metrics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaqwen.models.moe_balance import ALL_LAYERS, BalanceStats, RoutingCounts
from megaqwen.parallel import setup as par
from megaqwen.parallel.data_parallel import dp_reduce_mesh, unwrap
from megaqwen.train.config import Config
from megaqwen.train.forward import autocast_ctx, forward_step, model_inputs
from megaqwen.train.objective import Objective, ObjectiveParts


def _count_only(model, h: torch.Tensor, batch: dict) -> ObjectiveParts:
    zero = h.new_zeros(())
    return ObjectiveParts(zero, zero)


COUNT_ONLY = Objective("moe_balance_counts", _count_only, lambda b: torch.zeros(()), fields=())
"""The pre-pass's objective: nothing past the final norm (no LM head)."""


def balance_model(model, pipe=None):
    """The object whose `aux_terms` the step's forwards call (a pipeline's stage model, else the
    model under its data-parallel wrapper)."""
    return pipe.views[0]._model if pipe is not None else unwrap(model)


@torch.no_grad()
def prepare_balance(model, micro: list[dict], cfg: Config, env: par.DistEnv,
                    pipe=None) -> BalanceStats | None:
    """Collective (every rank of the step): the counting pre-pass when the model's `balance_counter`
    asks for one, its `BalanceStats` set as the model's `balance` (None otherwise). Call before the
    step's first forward; `release_balance` after its last backward."""
    target = balance_model(model, pipe)
    if not hasattr(target, "balance_counter"):
        return None
    target.balance = None
    counts = target.balance_counter(len(micro), env.dims)
    if counts is None:
        return None
    saved = [(mod, mod.load_E, mod.dropped) for mod in target.modules() if hasattr(mod, "load_E")]
    target.balance = counts
    try:
        with autocast_ctx(cfg.train.dtype, env.device):
            for b in micro:
                if pipe is not None:
                    pipe.forward_only(model_inputs(b, cfg, env.device), COUNT_ONLY, (),
                                      cfg.data.document_mask)
                else:
                    cp_group = env.mesh.group("cp") if env.dims.cp > 1 else None
                    forward_step(model, b, cfg, env.device, COUNT_ONLY, cp_group)
    finally:
        target.balance = None
        for mod, load, dropped in saved:  # the training forwards count the step's load
            mod.load_E, mod.dropped = load, dropped
    stats = reduce_counts(counts, micro, cfg, env, pipe)
    target.balance = stats
    return stats


def reduce_counts(counts: RoutingCounts, micro: list[dict], cfg: Config, env: par.DistEnv,
                  pipe=None) -> BalanceStats:
    """The pre-pass's local counts -> the step's `BalanceStats` (module docstring), one all-reduce."""
    mode, e, d = counts.mode, counts.width, env.dims
    device = env.device
    layers = sorted(counts.by_layer)
    full_tokens = [float(b["tokens"].numel()) for b in micro]  # B * T of each whole micro-batch
    if mode == "global_batch":
        rows = [torch.stack(counts.by_layer[lay]).sum(dim=(0, 1)) for lay in layers]  # (E,) each
        local = torch.stack([*rows, torch.zeros(e, dtype=torch.int64, device=device)]) if rows else \
            torch.zeros(1, e, dtype=torch.int64, device=device)
        local = local.to(device=device, dtype=torch.float64)
        local[-1, 0] = sum(full_tokens) / d.cp  # this rank's tokens (each cp rank: 1/cp of a row)
        if env.mesh is not None and d.dp * d.cp > 1:
            dist.all_reduce(local, group=dp_reduce_mesh(env.mesh).get_group())
        return BalanceStats(mode, {lay: [local[i]] for i, lay in enumerate(layers)}, [float(local[-1, 0])],
                            replicas=float(len(micro) * d.dp * d.cp))
    if mode == "micro_batch":
        per_micro = torch.zeros(len(micro), e, dtype=torch.float64, device=device)
        for lay in layers:
            per_micro += torch.stack([c.sum(0) for c in counts.by_layer[lay]]).to(per_micro)
        if d.cp > 1:
            dist.all_reduce(per_micro, group=env.mesh.group("cp"))
        if pipe is not None and d.pp > 1:
            dist.all_reduce(per_micro, group=pipe.pp_group)
        return BalanceStats(mode, {ALL_LAYERS: list(per_micro)}, full_tokens, replicas=float(d.cp))
    # sequence: (B, E) per layer and micro-batch, over the cp shards of the rows
    flat = [c for lay in layers for c in counts.by_layer[lay]]
    if flat and d.cp > 1:
        packed = torch.cat([c.reshape(-1) for c in flat]).to(device=device, dtype=torch.float64)
        dist.all_reduce(packed, group=env.mesh.group("cp"))
        flat = list(packed.split([c.numel() for c in flat]))
        flat = [f.view_as(c) for f, c in zip(flat, [c for lay in layers for c in counts.by_layer[lay]])]
    it = iter(flat)
    by_layer = {lay: [next(it) for _ in counts.by_layer[lay]] for lay in layers}
    row_len = [float(b["tokens"].shape[1]) for b in micro]
    return BalanceStats(mode, by_layer, row_len, replicas=float(d.cp))


def release_balance(model, pipe=None) -> None:
    """After the step's last backward: the model's forwards use their own counts again."""
    target = balance_model(model, pipe)
    if hasattr(target, "aux_terms"):
        target.balance = None
