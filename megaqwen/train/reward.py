"""The reward-model objective (`train.objective=reward`): Bradley–Terry on preference pairs.

A model with a score head (`model.head=score`) gives every token a scalar (`model.scores(h)`, (B, T)).
A row's reward is the score of its last response token: the token after the last position whose
label is not -100 (labels are shifted: labels[:, i] is the target of position i, so position i + 1
holds the last response token), or the row's last token when that label is at the end. For a
right-padded row whose response is its last non-pad content this is exactly the token HF's
`Qwen2ForSequenceClassification` pools (its last token that is not `pad_token_id`), so the exported
model gives the same rewards; a response must then not end in the pad id itself (<|endoftext|>;
ChatML responses end in <|im_end|>). A row without any labelled token is scored at its first token.

Each micro-batch holds pairs: row 2i is the chosen response, row 2i + 1 the rejected one (the same
prompt). Per pair, with r = reward and σ the logistic function,

    loss = -log σ(r_chosen - r_rejected) = softplus(-(r_chosen - r_rejected))

and the unit is the pair. Logged per pair (means over the step): `reward/accuracy` (r_chosen >
r_rejected), `reward/margin`, `reward/chosen`, `reward/rejected`.

Context parallelism: the scoring token lies on one cp rank's zig-zag shard. Each rank masks its
shard's scores to that token (by global token index) and `row_sums` adds the shards up (differentiably),
so every cp rank holds every reward and computes the same pair losses; each returns 1/cp of them, as
the step sums the objective over dp x cp ranks (and the all-reduce's backward sums the cp copies'
gradients back to the one scoring token).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.train.objective import Objective, ObjectiveParts, register_objective, row_sums

METRICS = ("reward/accuracy", "reward/margin", "reward/chosen", "reward/rejected")


def _cp(batch: dict[str, Any]) -> tuple[Any, int, int]:
    group = batch.get("cp_group")
    if group is None:
        return None, 1, 0
    import torch.distributed as dist

    return group, dist.get_world_size(group), dist.get_rank(group)


def scoring_mask(batch: dict[str, Any]) -> torch.Tensor:
    """(B, T) bool: the token whose score is each row's reward (see the module docstring), on this
    rank's shard of the row (all False on the cp ranks that do not hold it)."""
    labels = batch["labels"]
    group, cp, rank = _cp(batch)
    b, t = labels.shape
    if cp > 1:
        from megaqwen.parallel.context_parallel import zigzag_index

        index = zigzag_index(t * cp, cp, rank, labels.device)  # global token index of each local one
    else:
        index = torch.arange(t, device=labels.device)
    index = index.expand(b, -1)
    last = torch.where(labels != IGNORE_INDEX, index, torch.full_like(index, -1)).amax(1)  # (B,)
    if cp > 1:
        import torch.distributed as dist

        dist.all_reduce(last, op=dist.ReduceOp.MAX, group=group)
    target = torch.clamp(last + 1, max=t * cp - 1)
    return index == target[:, None]


def rewards(model, h_BTH: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """(B,) fp32 reward of every row: its scoring token's score, whole over cp shards."""
    at = scoring_mask(batch)
    picked = {"labels": torch.where(at, 0, IGNORE_INDEX), "cp_group": batch.get("cp_group")}
    return row_sums(model.scores(h_BTH), picked)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(P,) per-pair loss -log σ(chosen - rejected) (softplus: no overflow at large margins)."""
    return F.softplus(rejected - chosen)


def _parts(model, h: torch.Tensor, batch: dict[str, Any]) -> ObjectiveParts:
    if batch["labels"].shape[0] % 2:
        raise ValueError(f"train.objective=reward takes pairs of rows (chosen, rejected): a micro-batch "
                         f"of {batch['labels'].shape[0]} rows is odd; use an even train.micro_batch_size")
    r = rewards(model, h, batch)
    chosen, rejected = r[0::2], r[1::2]  # (P,)
    share = 1.0 / _cp(batch)[1]  # every cp rank holds the whole pair losses
    margin = (chosen - rejected).detach()
    metrics = {"reward/accuracy": (margin > 0).float().sum() * share,
               "reward/margin": margin.sum() * share,
               "reward/chosen": chosen.detach().sum() * share,
               "reward/rejected": rejected.detach().sum() * share}
    loss = bradley_terry(chosen, rejected).sum() * share
    # units: pairs, this cp rank's share (validation sums the parts over cp)
    return ObjectiveParts(loss, torch.tensor(chosen.shape[0] * share, device=loss.device), metrics)


def _pairs(batch: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(batch["labels"].shape[0] // 2)


REWARD = register_objective(Objective("reward", _parts, _pairs, fields=("labels",), metrics=METRICS))
"""Bradley–Terry reward-model training on (chosen, rejected) row pairs; the loss is nats per pair."""
