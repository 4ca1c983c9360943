"""AdamW with decoupled weight decay, and the learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch

from megaqwen.kernels.registry import build_adamw
from megaqwen.train.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never biases or norm weights (1-D tensors;
    ZeRO-3's partitioned parameters are judged by their full `ds_shape`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, impl: str = "auto",
                    device: str | None = None) -> torch.optim.Optimizer:
    """AdamW over decay/no-decay groups; `impl` is `kernels.adam` (auto | apex | torch)."""
    return build_adamw(param_groups(model, cfg.weight_decay), impl=impl, device=device, lr=cfg.lr,
                       betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup to lr, then half-cosine to min_lr at the last step.
    wsd:    linear warmup, constant lr, then a linear decay to min_lr over the last
            `decay_fraction` of the steps (MiniCPM's warmup-stable-decay).
    constant: linear warmup, then lr to the end (no decay).
    The schedule runs over [train.schedule_start, train.steps): a context-extension stage that
    continues a run restarts its warmup and decay from its first step. Both decaying schedules end
    at exactly min_lr on the last step, however short the run: with warmup_steps >= steps - 1
    there is no room for a decay, and the last step alone drops to min_lr (steps = warmup + 1 used
    to end at peak lr).
    """
    start = getattr(cfg, "schedule_start", 0)
    if start:
        from dataclasses import replace

        return lr_at(step - start, replace(cfg, steps=cfg.steps - start, schedule_start=0))
    last = cfg.steps - 1
    if cfg.schedule in ("cosine", "wsd") and step >= last:
        return cfg.min_lr
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        # here warmup_steps <= step < last: progress runs from 0 (peak) towards 1 (min_lr at `last`)
        progress = (step - cfg.warmup_steps) / (last - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_start = cfg.steps - max(int(round(cfg.decay_fraction * cfg.steps)), 1)
        if step < decay_start:
            return cfg.lr
        progress = min((step - decay_start + 1) / max(cfg.steps - decay_start, 1), 1.0)
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
