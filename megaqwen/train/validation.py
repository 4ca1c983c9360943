"""Validation loss during training: every `train.eval_every` steps, on held-out data.

The held-out samples are `data.valid_path` (a shard prefix or recipe) or, without it, the documents
that `data.valid_fraction` keeps out of training (`megaqwen.data.holdout`). Each evaluation reads the
same `eval_iters` global batches, cut across data-parallel ranks exactly as training batches are,
and reports the token-weighted mean loss over all of them (`val_loss`, `val_ppl`, `val_tokens`) and
the objective's metrics per unit (`val_<metric>`, e.g. `val_reward/accuracy` on held-out pairs).

The model is called through the trainer's own loss function, so every layout and engine is
evaluated the way it trains; it may return a mean loss (weighted here by the micro-batch's label
count) or a `(loss_sum, token_count)` pair.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megaqwen.kernels.cross_entropy import IGNORE_INDEX

log = logging.getLogger(__name__)


def _sum_and_count(out: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(out, tuple):  # LossParts / ObjectiveParts: (sum, count, ...)
        loss_sum, count = out[0], out[1]
        return loss_sum.detach().float(), torch.as_tensor(count, dtype=torch.float32, device=loss_sum.device)
    count = (batch["labels"] != IGNORE_INDEX).sum().to(device=out.device, dtype=torch.float32)
    return out.detach().float() * count, count


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], num_micro_batches: int,
             loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any],
             dp_group: dist.ProcessGroup | None = None,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             ) -> dict[str, float]:
    """Token-weighted mean loss over `num_micro_batches` of this rank's batches, summed over the
    data-parallel group (ranks that only split the model compute the same numbers and are not added)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    names: list[str] = []  # the objective's metrics (ObjectiveParts.metrics): the same on every rank
    try:
        for i in range(num_micro_batches):
            batch = next(batches)
            with autocast():
                out = loss_fn(model, batch)
            loss_sum, count = _sum_and_count(out, batch)
            metrics = getattr(out, "metrics", None) or {}
            if i == 0:
                names = sorted(metrics)
                total = torch.zeros(2 + len(names), dtype=torch.float64)
            total += torch.stack([loss_sum.cpu().double(), count.cpu().double(),
                                  *(metrics[n].detach().cpu().double() for n in names)])
    finally:
        model.train(was_training)
    if dp_group is not None:
        device = next(model.parameters()).device
        total_dev = total.to(device)  # nccl reduces device tensors only
        dist.all_reduce(total_dev, group=dp_group)
        total = total_dev.cpu()
    loss_sum, count, *metric_sums = total.tolist()
    loss = loss_sum / max(count, 1.0)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}
    # e.g. val_reward/accuracy: a reward model's accuracy on the held-out pairs
    out.update({f"val_{n}": v / max(count, 1.0) for n, v in zip(names, metric_sums, strict=True)})
    return out


class Validator:
    """Holds the held-out batches' source and decides when to evaluate."""

    def __init__(self, make_batches: Callable[[], Iterator[dict[str, torch.Tensor]]], num_micro_batches: int,
                 every: int, total_steps: int, loss_fn, dp_group=None, autocast=contextlib.nullcontext):
        self.make_batches, self.num_micro_batches = make_batches, num_micro_batches
        self.every, self.total_steps = every, total_steps
        self.loss_fn, self.dp_group, self.autocast = loss_fn, dp_group, autocast

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        out = evaluate(model, self.make_batches(), self.num_micro_batches, self.loss_fn, self.dp_group,
                       self.autocast)
        log.info("step %d validation | loss %.4f | ppl %.2f | %d tokens", step, out["val_loss"],
                 out["val_ppl"], out["val_tokens"])
        return out


def build_validator(cfg, env, data_path: str, loss_fn, autocast=contextlib.nullcontext) -> Validator | None:
    """A Validator for this rank (None when train.eval_every is 0). `data_path` is the resolved
    training data path, whose held-out documents are used unless data.valid_path is set."""
    from megaqwen.data.blend import build_dataset
    from megaqwen.data.holdout import split_documents
    from megaqwen.data.sampler import BatchIterator

    t, d = cfg.train, cfg.data
    if not t.eval_every:
        return None
    num_samples = t.eval_iters * t.global_batch_size
    if d.valid_path is not None:
        dataset = build_dataset(d.valid_path, seq_len=t.seq_len, num_samples=num_samples, seed=t.seed)
    else:
        dataset = build_dataset(data_path, seq_len=t.seq_len, num_samples=num_samples, seed=t.seed,
                                documents=lambda ix: split_documents(ix, d.valid_fraction, held_out=True))

    def make_batches():
        return BatchIterator(dataset, global_batch_size=t.global_batch_size,
                             micro_batch_size=t.micro_batch_size, dp_rank=env.dp_rank, dp_size=env.dp_size)

    per_step = t.global_batch_size // (t.micro_batch_size * env.dp_size)
    dp_group = env.mesh.dp_group if env.mesh is not None and env.dp_size > 1 else None
    return Validator(make_batches, t.eval_iters * per_step, t.eval_every, t.steps, loss_fn, dp_group,
                     autocast)


def training_documents(cfg) -> Callable | None:
    """For build_dataset: the documents training may read (all of them unless a split is held out)."""
    from megaqwen.data.holdout import split_documents

    d = cfg.data
    if d.valid_fraction == 0:
        return None
    return lambda ix: split_documents(ix, d.valid_fraction, held_out=False)
