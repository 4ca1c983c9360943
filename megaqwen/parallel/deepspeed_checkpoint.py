"""The DeepSpeed engine's checkpoints in the native engine's format (torch.distributed.checkpoint).

Both engines write the same keys, so a checkpoint resumes under either engine and any layout:
    "model"  FQN -> the fp32 weight (DeepSpeed: its fp32 master copy, also under bf16)
    "optim"  torch's flattened AdamW state: state.<fqn>.exp_avg | exp_avg_sq | step and
             param_groups.<fqn>.<hyper-parameter> (lr, betas, eps, weight_decay, ...)
TP-sharded tensors are wrapped as DTensors of the full tensor exactly as `checkpoint.sharded_state`
does for the native engine, and DeepSpeed's ZeRO partitions are read and written through its
tensor-fragment API (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state` and the setters),
which works for ZeRO 1, 2 and 3. FQNs are the module's own (`engine.module`), the native model's.

Memory: each rank materialises the full TP-local fp32 weight and both Adam moments of every
parameter (3 x 4 bytes x its TP-local parameter count) for the duration of a save or load; ZeRO's
dp partitioning is undone in that buffer. The LR comes from `train.optim.lr_at` every step (DeepSpeed
owns no scheduler here); the saved `lr` is the last step's, as the native engine's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from megaqwen.parallel.shards import ShardMap

STEP = "step"
# optimizer hyper-parameters restored on load (device/implementation flags such as fused, foreach,
# capturable stay the running optimizer's, as they depend on where it runs)
HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


@dataclass
class _Entry:
    fqn: str
    param: nn.Parameter  # the module's (low-precision, or ZeRO-3 partitioned) parameter
    group: int  # index into the inner optimizer's param_groups
    flat: torch.Tensor  # the fp32 flat partition its optimizer state is keyed by

    @property
    def shape(self) -> torch.Size:
        return getattr(self.param, "ds_shape", self.param.shape)


def _zero(engine):
    """DeepSpeed's ZeRO optimizer (the wrapper around our AdamW)."""
    opt = engine.optimizer
    if not hasattr(opt, "optimizer"):
        raise ValueError(f"DeepSpeed engine without a ZeRO optimizer ({type(opt).__name__}); megaqwen builds "
                         "ZeRO stage 1, 2 or 3 (parallel.zero_stage)")
    return opt


def _entries(engine) -> list[_Entry]:
    """Every trainable parameter with its FQN, param group and fp32 flat partition, in the same
    order on every rank (the getters are collectives over dp)."""
    opt = _zero(engine)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = []
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for sub, params in enumerate(opt.fp16_groups):
            flat = opt.fp32_partitioned_groups_flat[sub]
            out += [_Entry(names[id(p)], p, opt.sub_group_to_group_id[sub], flat) for p in params]
    else:  # ZeRO 1 / 2
        for i, params in enumerate(opt.bit16_groups):
            out += [_Entry(names[id(p)], p, i, opt.single_partition_of_fp32_groups[i]) for p in params]
    return out


def _init_state(engine, entries: list[_Entry]) -> None:
    """Create the inner AdamW's state if it has none yet (a resume before any step): one step
    with zero gradients at lr 0, as torch's `_init_optim_state` does, keeping DeepSpeed's own
    gradient buffers (ZeRO-3 hands its partitions to the optimizer only inside a step, so they are
    put in its groups for this one); then link ZeRO 1/2's per-parameter fragments to it."""
    opt = _zero(engine)
    inner = opt.optimizer
    flats: dict[int, tuple[torch.Tensor, int]] = {id(e.flat): (e.flat, e.group) for e in entries}
    if any(f not in inner.state for f, _ in flats.values()):
        saved = [(g["params"], g["lr"]) for g in inner.param_groups]
        grads = [f.grad for f, _ in flats.values()]
        for g in inner.param_groups:
            g["params"], g["lr"] = [], 0.0
        for f, group in flats.values():
            inner.param_groups[group]["params"].append(f)
            f.grad = torch.zeros_like(f)
        inner.step()
        for (f, _), grad in zip(flats.values(), grads):
            f.grad = grad
        for g, (params, lr) in zip(inner.param_groups, saved):
            g["params"], g["lr"] = params, lr
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2: fragments -> state views
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _moment_keys(engine, entries: list[_Entry]) -> list[str]:
    """The per-element optimizer state names (exp_avg, exp_avg_sq[, max_exp_avg_sq])."""
    state = _zero(engine).optimizer.state[entries[0].flat]
    return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == entries[0].flat.shape)


def _tp_wrap(shards: ShardMap | None):
    """fqn, full TP-local tensor -> what DCP stores (a DTensor of the full tensor when TP-sharded)."""
    from megaqwen.parallel.dtensor_shards import DTensorWrapper, param_tags

    tags = param_tags(shards)
    wrap = DTensorWrapper(shards.mesh) if tags else None

    def f(fqn: str, t: torch.Tensor) -> torch.Tensor:
        return wrap(t, *tags[fqn]) if fqn in tags else t

    return f


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _state(engine, shards: ShardMap | None, with_optim: bool, full, keep) -> dict[str, Any]:
    """{"model": ..., "optim": ...} in the native engine's keys. `full(entry, name)`: the full
    TP-local fp32 tensor of the weight (name None) or a moment; `keep(key, name)`: whether the
    hyper-parameter `name` goes in under `key`."""
    entries = _entries(engine)
    if with_optim:
        _init_state(engine, entries)
    wrap = _tp_wrap(shards)
    inner = _zero(engine).optimizer
    moments = _moment_keys(engine, entries) if with_optim else []
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    for e in entries:
        model_sd[e.fqn] = wrap(e.fqn, full(e, None))
        if not with_optim:
            continue
        for k in moments:
            optim_sd[f"state.{e.fqn}.{k}"] = wrap(e.fqn, full(e, k))
        optim_sd[f"state.{e.fqn}.{STEP}"] = inner.state[e.flat][STEP].detach().clone()
        for k, v in inner.param_groups[e.group].items():
            key = f"param_groups.{e.fqn}.{k}"
            if keep(key, k):
                optim_sd[key] = v
    return {"model": model_sd, "optim": optim_sd} if with_optim else {"model": model_sd}


def deepspeed_state(engine, shards: ShardMap | None, with_optim: bool = True) -> dict[str, Any]:
    """Collective over the dp group: the engine's values for `dcp.save`, in the native keys."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    def full(e: _Entry, name: str | None) -> torch.Tensor:
        if name is None:
            return safe_get_full_fp32_param(e.param).float().reshape(e.shape)
        return safe_get_full_optimizer_state(e.param, name).float().reshape(e.shape)

    return _state(engine, shards, with_optim, full, lambda key, name: name != "params")


def _buffers(engine, shards: ShardMap | None, with_optim: bool, saved_keys: set[str]) -> dict[str, Any]:
    """Empty fp32 tensors of the full TP-local shapes for `dcp.load` to fill, under the keys
    `deepspeed_state` writes; of the hyper-parameters, those in HYPER that the checkpoint holds."""
    device = _entries(engine)[0].flat.device

    def full(e: _Entry, name: str | None) -> torch.Tensor:
        return torch.empty(e.shape, dtype=torch.float32, device=device)

    return _state(engine, shards, with_optim, full,
                  lambda key, name: name in HYPER and f"optim.{key}" in saved_keys)


def _saved_keys(path: str) -> set[str]:
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


@torch.no_grad()
def _restore(engine, state: dict[str, Any], with_optim: bool) -> None:
    """The loaded values into DeepSpeed's fp32 partitions (and optimizer), then its module weights."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = _zero(engine)
    inner = opt.optimizer
    entries = _entries(engine)
    keys = _moment_keys(engine, entries) if with_optim else []
    for e in entries:
        safe_set_full_fp32_param(e.param, _local(state["model"][e.fqn]))
        if not with_optim:
            continue
        optim = state["optim"]
        for k in keys:
            safe_set_full_optimizer_state(e.param, _local(optim[f"state.{e.fqn}.{k}"]), k)
        step = optim[f"state.{e.fqn}.{STEP}"]
        s = inner.state[e.flat]
        s[STEP] = step.to(s[STEP]) if torch.is_tensor(s[STEP]) else type(s[STEP])(step)
        group = inner.param_groups[e.group]
        for k in HYPER:
            key = f"param_groups.{e.fqn}.{k}"
            if key in optim:
                group[k] = tuple(optim[key]) if isinstance(group[k], tuple) else optim[key]
    _update_module_weights(opt)


def _update_module_weights(opt) -> None:
    """Copy the fp32 partitions into the module's parameters (bf16 or fp32; all-gathered over dp
    for ZeRO 1/2, back into each rank's partition for ZeRO-3)."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for sub in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(sub)
    else:
        opt.update_lp_params()


def load_deepspeed(path: str, engine, shards: ShardMap | None, with_optim: bool = True) -> None:
    """Collective: load a DCP checkpoint written by either engine under any layout into the
    engine's ZeRO partitions (weights only without `with_optim`)."""
    import torch.distributed.checkpoint as dcp

    state = _buffers(engine, shards, with_optim, _saved_keys(path))
    dcp.load(state, checkpoint_id=path)
    _restore(engine, state, with_optim)
