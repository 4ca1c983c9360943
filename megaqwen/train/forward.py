"""One micro-batch through the model for an objective: the inputs the model is called with, the
autocast region, the context-parallel shard. Shared by the trainer step, validation and the frozen
reference model (`megaqwen.train.reference`), so all three run the model the same way."""

from __future__ import annotations

import contextlib

import torch

from megaqwen.kernels.attention import AttentionMeta
from megaqwen.models.outputs import ForwardOut
from megaqwen.parallel import setup as par
from megaqwen.train.build import use_bf16
from megaqwen.train.config import Config
from megaqwen.train.fp8 import fp8_context
from megaqwen.train.objective import Objective
from megaqwen.train.objectives import objective_for


def autocast_ctx(dtype: str, device: torch.device):
    """bf16 autocast where `use_bf16` (fp32 master weights stay fp32); fp32 otherwise."""
    if not use_bf16(dtype, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def model_inputs(batch: dict[str, torch.Tensor], cfg: Config,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """tokens, labels, explicit position_ids (reset per document with data.reset_position_ids),
    document_ids and whatever other fields an objective reads (e.g. `reference_logprobs`) of one
    micro-batch, on `device`."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    tokens = batch["tokens"]
    if not cfg.data.reset_position_ids:
        batch["position_ids"] = torch.arange(tokens.shape[1], device=device).expand_as(tokens).contiguous()
    return batch


def forward_step(model, batch: dict[str, torch.Tensor], cfg: Config, device: torch.device,
                 objective: Objective, cp_group=None) -> ForwardOut:
    """One micro-batch through the model (its wrapper's forward) for `objective`: ForwardOut(the
    objective's parts, the model's named aux terms). Positions are always explicit; the document
    boundaries become one AttentionMeta for every layer. Under context parallelism (`cp_group`) every
    cp rank holds the whole micro-batch and runs its zig-zag shard of the sequence: the parts are
    then this shard's (the objective sees the shard's fields)."""
    b = model_inputs(batch, cfg, device)
    fp8 = fp8_context(cfg.train.fp8, cfg.parallel.tp_linear_backend)  # TE's recipe; torchao: nothing
    if cp_group is not None:
        from megaqwen.parallel.context_parallel import context_parallel_inputs

        local, meta = context_parallel_inputs(b, cp_group, document_mask=cfg.data.document_mask,
                                              tile=cfg.parallel.cp_tile)
        with fp8:
            return model(local["tokens"], position_ids=local["position_ids"], document_ids=meta,
                         objective=objective, batch={**local, "cp_group": cp_group})
    attn = AttentionMeta(b["document_ids"]) if cfg.data.document_mask else None
    with fp8:
        return model(b["tokens"], position_ids=b["position_ids"], document_ids=attn, objective=objective,
                     batch={**b, "cp_group": None})


def validation_parts(model, batch, cfg: Config, env: par.DistEnv, objective: Objective | None = None):
    """Validation parts (sum, count, metrics) of one micro-batch under `objective` (the run's, resolved
    once by the trainer; default `objective_for(cfg)`); under context parallelism summed over the cp
    group in one all-reduce, so every cp rank reports the whole micro-batch."""
    objective = objective if objective is not None else objective_for(cfg)
    if env.mesh is None or env.dims.cp == 1:
        return forward_step(model, batch, cfg, env.device, objective).parts
    import torch.distributed as dist

    from megaqwen.train.objective import ObjectiveParts

    group = env.mesh.group("cp")
    parts = forward_step(model, batch, cfg, env.device, objective, group).parts
    names = sorted(parts.metrics)
    # (2 + M,) float64 [sum, count, *metrics]: one collective instead of one per value; float64
    # keeps the token counts exact
    count = torch.as_tensor(parts.count, device=parts.sum.device)
    stacked = torch.stack([parts.sum.detach().double(), count.double(),
                           *(parts.metrics[n].detach().double() for n in names)])
    dist.all_reduce(stacked, group=group)
    return ObjectiveParts(stacked[0], stacked[1], dict(zip(names, stacked[2:], strict=True)))
