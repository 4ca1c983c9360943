"""The reward-model objective (`train.objective=reward`): Bradley–Terry on preference pairs.

A model with a score head (`model.head=score`) gives every token a scalar (`model.scores(h)`, (B, T)).
A row's reward is the score of its last token that is not the pad id (`model.pad_token_id`,
<|endoftext|>): exactly the token HF's `Qwen2ForSequenceClassification` pools with the exported
`pad_token_id`, so the exported model gives the same rewards. With the dpo shards' rows (megaqwen.data
.pairs: prompt + response, padded with <|endoftext|>) that is the response's last token, the `\n` after
its `<|im_end|>`, as in `apply_chat_template` output scored by HF at inference. A row of pads only is
scored at its first token (HF's argmax of an all-zero mask).

Each micro-batch holds pairs: row 2i is the chosen response, row 2i + 1 the rejected one (the same
prompt). Per pair, with r = reward and σ the logistic function,

    loss = -log σ(r_chosen - r_rejected) = softplus(-(r_chosen - r_rejected))

and the unit is the pair. Logged per pair (means over the step): `reward/accuracy` (r_chosen >
r_rejected), `reward/margin`, `reward/chosen`, `reward/rejected`; validation adds the same on held-out
pairs (`val_reward/accuracy`, ...).

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

from megaqwen.data.pairs import check_pair_rows
from megaqwen.train.objective import Objective, ObjectiveParts, cp_size, register_objective, row_sums

METRICS = ("reward/accuracy", "reward/margin", "reward/chosen", "reward/rejected")


def _cp(batch: dict[str, Any]) -> tuple[Any, int, int]:
    group = batch.get("cp_group")
    if group is None:
        return None, 1, 0
    import torch.distributed as dist

    return group, dist.get_world_size(group), dist.get_rank(group)


def scoring_mask(tokens: torch.Tensor, pad_id: int, cp_group=None) -> torch.Tensor:
    """(B, T) bool: the token whose score is each row's reward, its last one that is not `pad_id`
    (see the module docstring), on this rank's shard of the row (all False on the cp ranks that do
    not hold it). `tokens`: this rank's (B, T) shard."""
    group, cp, rank = _cp({"cp_group": cp_group})
    b, t = tokens.shape
    if cp > 1:
        from megaqwen.parallel.context_parallel import zigzag_index

        index = zigzag_index(t * cp, cp, rank, tokens.device)  # global token index of each local one
    else:
        index = torch.arange(t, device=tokens.device)
    index = index.expand(b, -1)
    last = torch.where(tokens != pad_id, index, torch.zeros_like(index)).amax(1)  # (B,); all pad: 0
    if cp > 1:
        import torch.distributed as dist

        dist.all_reduce(last, op=dist.ReduceOp.MAX, group=group)
    return index == last[:, None]


def rewards(model, h_BTH: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """(B,) fp32 reward of every row: its scoring token's score, whole over cp shards."""
    at = scoring_mask(batch["tokens"], model.cfg.pad_token_id, batch.get("cp_group"))
    return row_sums(model.scores(h_BTH), batch, mask_BT=at)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(P,) per-pair loss -log σ(chosen - rejected) (softplus: no overflow at large margins)."""
    return F.softplus(rejected - chosen)


def _parts(model, h: torch.Tensor, batch: dict[str, Any]) -> ObjectiveParts:
    check_pair_rows(batch["tokens"].shape[0], "train.objective=reward")
    r = rewards(model, h, batch)
    chosen, rejected = r[0::2], r[1::2]  # (P,)
    share = 1.0 / cp_size(batch)  # every cp rank holds the whole pair losses
    margin = (chosen - rejected).detach()
    metrics = {"reward/accuracy": (margin > 0).float().sum() * share,
               "reward/margin": margin.sum() * share,
               "reward/chosen": chosen.detach().sum() * share,
               "reward/rejected": rejected.detach().sum() * share}
    loss = bradley_terry(chosen, rejected).sum() * share
    # units: pairs, this cp rank's share (validation sums the parts over cp)
    return ObjectiveParts(loss, torch.tensor(chosen.shape[0] * share, device=loss.device), metrics)


def check_head(cfg, objective: Objective) -> None:
    """Before any work: train.objective=reward needs model.head=score, and a score head trains with no
    other built-in objective (it has no LM head; a user's `package.module:NAME` may use `scores`); a
    ValueError naming the fix."""
    head = cfg.model.head
    if objective is REWARD and head != "score":
        raise ValueError(f"train.objective=reward trains a score head: set model.head=score and "
                         f"model.tie_word_embeddings=false (model.head is {head!r})")
    if objective is not REWARD and head == "score" and ":" not in cfg.train.objective:
        raise ValueError(f"model.head=score (a reward model) has no LM head for train.objective="
                         f"{objective.name}; use train.objective=reward")


def _pairs(batch: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(batch["tokens"].shape[0] // 2)


# "tokens": the last stage of a pipeline gets them as a field (the scoring token is found by them)
REWARD = register_objective(Objective("reward", _parts, _pairs, fields=("tokens",), metrics=METRICS))
"""Bradley–Terry reward-model training on (chosen, rejected) row pairs; the loss is nats per pair."""
