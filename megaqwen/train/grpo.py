"""Group relative policy optimisation (`train.objective=grpo`) on the objective contract, and its pure
pieces: group-normalised advantages and the all-equal group filter.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300 eq. 3, with its k3 KL estimator eq. 4) samples
G responses o_1..o_G per prompt q, scores them with rewards r_i, and gives every token of o_i the
advantage A_i = (r_i - mean(r)) / std(r) over its group (`group_advantages`; Dr. GRPO, Liu et al.
2025, arXiv:2503.20783, drops the std: `grpo.std_normalize=false`). Per response token t of o_i, with
the policy pi, the policy that sampled (or last updated before) the rollout pi_old and the frozen
reference pi_ref:

    ratio   = pi(o_it) / pi_old(o_it)                        = exp(logp - old_logp)
    surr    = -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A)
              (DAPO's clip-higher, Yu et al. 2025, arXiv:2503.14476 eq. 10: clip_high > clip_low)
    k3      = pi_ref / pi - log(pi_ref / pi) - 1              = exp(ref - logp) - (ref - logp) - 1
    l_it    = surr + kl_coef k3

aggregated over the step's responses per `grpo.loss_agg`:

    token     sum_i sum_t l_it / sum_i |o_i|                       (DAPO eq. 12: token-level)
    sequence  mean_i (sum_t l_it / |o_i|)                         (GRPO eq. 3: per-response mean)
    constant  mean_i (sum_t l_it / max_new_tokens)                (Dr. GRPO: a constant per response)

Each is `sum / units` as the contract's step divides it, exactly under accumulation, dp, cp and pp:
units are the response tokens (`token`) or the responses (`sequence`, `constant`, a row with at least
one label), counted by `units(batch)` on whole micro-batches before the forward; `sum` is the micro-
batch's share. A response is one row, never split across micro-batches (rows are not packed: a row
holding several documents is refused); under context parallelism a row IS split across the cp ranks:
`sequence` divides each row's total by its length after `row_sums` all-reduces both over the cp group
(differentiably), and every cp rank then reports 1/cp of the row's term (as dpo); `token` and
`constant` are plain per-token sums, which add up over the shards.

The batch fields the objective reads (the GRPO loop, `megaqwen.train.rollout*`, produces them):

    tokens              (B, T) int64    prompt + response (+ padding), one response per row
    labels              (B, T) int64    the next-token targets as the trainer's labels: labels[:, i] =
                                        tokens[:, i + 1] on response tokens, -100 on the prompt, the
                                        padding and anything not trained (the only loss mask: there is
                                        no separate `loss_mask` field; a batch holding one is refused)
    advantages          (B, T) float    each token's advantage (per response: `token_advantages`
                        or (B,)         broadcasts the (B,) values; use (B, T) under pp x cp, where the
                                        pipeline shards every field along the sequence)
    old_logprobs        (B, T) float    log pi_old of each label (0 where -100): recomputed with the
                                        policy before the first update of a rollout batch, or the
                                        engine's sampling log-probs (`grpo.old_logprobs`). Not read
                                        on-policy (`on_policy`: updates_per_rollout=1 with recompute):
                                        pi_old is then the policy itself, so the objective takes its
                                        own log-probs, detached (ratio 1, the gradient A grad log pi;
                                        TRL's GRPOTrainer does the same), and no extra forward runs
    reference_logprobs  (B, T) float    when grpo.kl_coef > 0 only: filled by the trainer
                                        (`megaqwen.train.reference`, REFERENCE_FIELD)

plus the model inputs the trainer reads (position_ids, document_ids when data.document_mask). The
policy's log-probabilities come from `model.token_logprobs(h, labels)` (chunked, vocab-parallel under
tp), so every layout of pretraining applies. All log-probabilities are the untempered policy's
(temperature 1), as the engines' sampling log-probs and the reference's: a sampling temperature shapes
the behaviour policy only (TRL and verl divide the logits by it in training too; not done here).

Metrics (`grpo/*`, means per unit of the step, i.e. per token under `token`, per response under
`sequence` / `constant`, where each response contributes its token mean): grpo/clip_low and
grpo/clip_high (share of tokens where the clipped branch is taken: A < 0 and ratio < 1 - clip_low, A
> 0 and ratio > 1 + clip_high), grpo/ratio, grpo/kl (k3, kl_coef > 0 only), grpo/nll (the sampled
tokens' -log pi: a Monte-Carlo estimate of the policy's per-token entropy on its own samples; the exact
entropy needs the full vocabulary distribution, which the contract never materialises), and under
per-response aggregation grpo/response_length (tokens). Reward and rollout statistics are the loop's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.rewards.spec import RewardSpec
from megaqwen.train.objective import (
    REFERENCE_FIELD,
    Objective,
    ObjectiveParts,
    cp_size,
    label_logprobs,
    register_objective,
    row_sums,
)

LOSS_AGGS = ("token", "sequence", "constant")
OLD_LOGPROBS = ("recompute", "rollout")


@dataclass
class GRPOConfig:
    """Online GRPO (`train.objective=grpo`): rollouts, advantages and the clipped surrogate."""

    group_size: int = 8
    """G: responses sampled per prompt; advantages are normalised within each prompt's group."""
    clip_low: float = 0.2
    """Lower clip of the importance ratio: ratio >= 1 - clip_low counts (PPO's epsilon)."""
    clip_high: float = 0.2
    """Upper clip of the importance ratio: ratio <= 1 + clip_high counts (DAPO's clip-higher: 0.28)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL estimate to the frozen reference (train.reference_from, else
    train.init_from) per token; 0 builds no reference model."""
    loss_agg: str = "token"
    """token: sum over the step's response tokens / their count (DAPO) | sequence: each response's
    token mean, then the mean over responses (GRPO) | constant: each response's token sum /
    grpo.max_new_tokens, mean over responses (Dr. GRPO)."""
    std_normalize: bool = True
    """Divide each group's centred rewards by the group's standard deviation (GRPO); false: centre only
    (Dr. GRPO)."""
    std_eps: float = 1e-6
    """Added to the group standard deviation before dividing (a group of equal rewards gets A = 0)."""
    filter_equal_groups: bool = False
    """Drop the groups whose rewards are all equal (zero advantage, no learning signal; DAPO's dynamic
    sampling) before the update; counted in the loop's metrics."""
    updates_per_rollout: int = 1
    """mu: optimizer steps on each rollout batch (1: on-policy; > 1 reuses the batch with the clip)."""
    old_logprobs: str = "recompute"
    """Where log pi_old comes from: recompute (a forward of the policy before the first update, on the
    trainer's numerics) | rollout (the generation engine's sampling log-probabilities)."""
    routing_replay: bool = False
    """MoE policies: route every token of the training (and old-log-prob) forwards to the experts the
    rollout chose for it (rollout routing replay, arXiv:2510.11370), so an update's ratios are not
    moved by routing changes; the router's weights at those experts are still trained. Native engine."""
    max_new_tokens: int = 256
    """Tokens generated per response at most; also the constant divisor of loss_agg=constant."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    """Reward components summed with their weights (megaqwen/rewards), e.g.
    [{name: math, weight: 1.0}, {name: format, weight: 0.1}, {name: rm, path: runs/rm, weight: 0.5}]."""


def on_policy(cfg: GRPOConfig) -> bool:
    """pi_old is the policy being trained (one update per rollout batch, old log-probs recomputed): the
    objective uses its own log-probs, detached, and reads no `old_logprobs`."""
    return cfg.updates_per_rollout == 1 and cfg.old_logprobs == "recompute"


# ---------------------------------------------------------------------------------------------
# pure pieces: advantages, the group filter, the per-token loss


def group_advantages(rewards_N: torch.Tensor, group_size: int, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """(N,) advantages of N = prompts x group_size rewards laid out group by group: the reward minus
    its group's mean, divided by (the group's standard deviation + eps) when `std_normalize`. The std
    is the sample one (n - 1 in the denominator), as TRL's and verl's GRPO use."""
    if group_size < 2 or rewards_N.dim() != 1 or rewards_N.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards_N.shape)} do not split into groups of "
                         f"{group_size} (need a 1-D tensor of prompts x group_size, group_size >= 2)")
    r_PG = rewards_N.float().view(-1, group_size)
    a_PG = r_PG - r_PG.mean(1, keepdim=True)
    if std_normalize:
        a_PG = a_PG / (r_PG.std(1, keepdim=True) + eps)
    return a_PG.reshape(-1)


def equal_groups(rewards_N: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool: the groups (prompts) whose group_size rewards are all equal (exactly)."""
    if group_size < 1 or rewards_N.dim() != 1 or rewards_N.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards_N.shape)} do not split into groups of "
                         f"{group_size}")
    r_PG = rewards_N.view(-1, group_size)
    return (r_PG == r_PG[:, :1]).all(1)


def kept_rows(rewards_N: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool: the rows of the groups `equal_groups` does not drop (grpo.filter_equal_groups)."""
    return (~equal_groups(rewards_N, group_size)).repeat_interleave(group_size)


def token_advantages(advantages: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) advantages from per-response (B,) or per-token (B, T) ones (0 where the label is -100)."""
    if advantages.shape == labels_BT.shape:
        adv_BT = advantages
    elif advantages.dim() == 1 and advantages.shape[0] == labels_BT.shape[0]:
        adv_BT = advantages[:, None].expand_as(labels_BT)
    else:
        raise ValueError(f"advantages of shape {tuple(advantages.shape)} fit neither the rows "
                         f"({labels_BT.shape[0]},) nor the tokens {tuple(labels_BT.shape)} of the batch")
    return torch.where(labels_BT != IGNORE_INDEX, adv_BT.float(), 0.0)


@dataclass(frozen=True)
class TokenTerms:
    """Per-token pieces of the GRPO loss, (B, T) each, 0 where the label is -100."""

    loss: torch.Tensor
    """surr + kl_coef k3 (with grad)."""
    ratio: torch.Tensor
    clipped_low: torch.Tensor
    """1.0 where A < 0 and ratio < 1 - clip_low (the clipped branch: no gradient from the surrogate)."""
    clipped_high: torch.Tensor
    """1.0 where A > 0 and ratio > 1 + clip_high."""
    k3: torch.Tensor | None
    """The k3 KL estimate (None without a reference)."""


def token_terms(logp_BT: torch.Tensor, old_BT: torch.Tensor, adv_BT: torch.Tensor, valid_BT: torch.Tensor,
                clip_low: float, clip_high: float, kl_coef: float = 0.0,
                ref_BT: torch.Tensor | None = None) -> TokenTerms:
    """The per-token clipped surrogate (+ kl_coef k3 to `ref_BT`) of the module docstring."""
    zero = torch.zeros_like(logp_BT)
    log_ratio = torch.where(valid_BT, logp_BT - old_BT.float(), zero)
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid_BT, adv_BT.float(), zero)
    surr = -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv)
    loss, k3 = surr, None
    if ref_BT is not None:
        d = torch.where(valid_BT, ref_BT.float() - logp_BT, zero)  # log(pi_ref / pi)
        k3 = torch.exp(d) - d - 1.0
        loss = surr + kl_coef * k3 if kl_coef else surr
    with torch.no_grad():
        r = ratio.detach()
        low = (valid_BT & (adv < 0) & (r < 1.0 - clip_low)).float()
        high = (valid_BT & (adv > 0) & (r > 1.0 + clip_high)).float()
    loss = torch.where(valid_BT, loss, zero)
    return TokenTerms(loss, torch.where(valid_BT, r, zero), low, high,
                      None if k3 is None else torch.where(valid_BT, k3.detach(), zero))


# ---------------------------------------------------------------------------------------------
# the objective


def grpo_metric_names(cfg: GRPOConfig) -> tuple[str, ...]:
    names = ["grpo/clip_low", "grpo/clip_high", "grpo/ratio", "grpo/nll"]
    if cfg.kl_coef > 0:
        names.append("grpo/kl")
    if cfg.loss_agg != "token":
        names.append("grpo/response_length")
    return tuple(names)


def _row_totals(values_BTK: torch.Tensor, valid_BT: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """(B, K) per-row sums of K detached per-token values over the valid labels, whole over cp."""
    sums = torch.where(valid_BT[..., None], values_BTK, torch.zeros_like(values_BTK)).sum(1)
    if cp_size(batch) > 1:
        import torch.distributed as dist

        dist.all_reduce(sums, group=batch["cp_group"])
    return sums


def _grpo_parts(cfg: GRPOConfig, model, h: torch.Tensor, batch: dict[str, Any]) -> ObjectiveParts:
    labels = batch["labels"]  # (B, T): this cp rank's shard
    valid = labels != IGNORE_INDEX
    logp = label_logprobs(model, h, labels).float()  # the head only at the response positions
    ref = batch[REFERENCE_FIELD] if cfg.kl_coef > 0 else None
    old = logp.detach() if on_policy(cfg) else batch["old_logprobs"]
    terms = token_terms(logp, old, token_advantages(batch["advantages"], labels), valid,
                        cfg.clip_low, cfg.clip_high, cfg.kl_coef, ref)
    stats = {"grpo/clip_low": terms.clipped_low, "grpo/clip_high": terms.clipped_high,
             "grpo/ratio": terms.ratio, "grpo/nll": -logp.detach()}
    if terms.k3 is not None:
        stats["grpo/kl"] = terms.k3
    if cfg.loss_agg == "token":
        metrics = {k: torch.where(valid, v, 0.0).sum() for k, v in stats.items()}
        return ObjectiveParts(terms.loss.sum(), valid.sum(), metrics)
    # per response: a row with at least one label; n_B its length over the whole row (all cp shards)
    names = list(stats)
    with torch.no_grad():
        totals_BK = _row_totals(torch.stack([stats[k] for k in names] + [valid.float()], -1), valid, batch)
    n_B = totals_BK[:, -1]
    rows = n_B > 0
    share = 1.0 / cp_size(batch)  # every cp rank holds the whole rows' terms: each reports 1/cp
    if cfg.loss_agg == "sequence":
        per_row = row_sums(terms.loss, batch, valid) / n_B.clamp(min=1)
        total = per_row[rows].sum() * share
    else:  # constant: a plain per-token sum, additive over the cp shards
        total = terms.loss.sum() / cfg.max_new_tokens
    means_BK = totals_BK[:, :-1] / n_B.clamp(min=1)[:, None]
    metrics = {k: means_BK[rows, i].sum() * share for i, k in enumerate(names)}
    metrics["grpo/response_length"] = n_B[rows].sum() * share
    count = rows.sum() * share
    return ObjectiveParts(total, count, metrics)


def _units(cfg: GRPOConfig, batch: dict[str, Any]) -> torch.Tensor:
    """Response tokens (loss_agg=token) or responses (rows with a label) of a whole micro-batch."""
    if "loss_mask" in batch:
        raise ValueError("the grpo batch holds a `loss_mask`: set those labels to -100 instead (labels are "
                         "the objective's only mask, so every layout, pipelines included, sees it)")
    doc = batch.get("document_ids")
    if doc is not None and bool((doc != doc[:, :1]).any()):
        raise ValueError("a grpo micro-batch row holds several documents: rows must not be packed (one "
                         "response per row, so per-response aggregation and cp row sums see whole rows)")
    valid = batch["labels"] != IGNORE_INDEX
    if cfg.loss_agg == "token":
        return valid.sum()
    return valid.any(1).sum()


def grpo_objective(cfg: GRPOConfig) -> Objective:
    """GRPO with these settings (see the module docstring); needs_reference iff kl_coef > 0."""
    fields = ("labels", "advantages") + (() if on_policy(cfg) else ("old_logprobs",))
    fields += (REFERENCE_FIELD,) if cfg.kl_coef > 0 else ()
    return Objective("grpo", lambda model, h, batch: _grpo_parts(cfg, model, h, batch),
                     lambda batch: _units(cfg, batch), fields=fields, needs_reference=cfg.kl_coef > 0,
                     metrics=grpo_metric_names(cfg))


GRPO = register_objective(grpo_objective(GRPOConfig()))
"""GRPO with the default settings (kl_coef 0: no reference); a run's own comes from `objective_for(cfg)`."""


def check_grpo(cfg) -> None:
    """ValueError naming the setting when a GRPO run's config (`cfg.grpo`, `cfg.train`) cannot work."""
    from megaqwen.suggest import check_choice

    g, t = cfg.grpo, cfg.train
    check_choice("grpo.loss_agg", g.loss_agg, LOSS_AGGS)
    check_choice("grpo.old_logprobs", g.old_logprobs, OLD_LOGPROBS)
    if g.group_size < 2:
        raise ValueError(f"grpo.group_size must be >= 2 (advantages compare a prompt's responses), got "
                         f"{g.group_size}")
    if not 0 <= g.clip_low < 1 or not g.clip_high >= 0:
        raise ValueError(f"need 0 <= grpo.clip_low < 1 and grpo.clip_high >= 0, got {g.clip_low} and "
                         f"{g.clip_high}")
    if not g.kl_coef >= 0:
        raise ValueError(f"grpo.kl_coef must be >= 0 (0: no reference model), got {g.kl_coef}")
    if not g.std_eps > 0:
        raise ValueError(f"grpo.std_eps must be positive, got {g.std_eps}")
    if g.updates_per_rollout < 1 or g.max_new_tokens < 1:
        raise ValueError(f"grpo.updates_per_rollout ({g.updates_per_rollout}) and grpo.max_new_tokens "
                         f"({g.max_new_tokens}) must be >= 1")
    if g.routing_replay:
        from megaqwen.models.spec import get_spec

        if cfg.rollout.engine != "native":
            raise ValueError(f"grpo.routing_replay=true needs the experts the rollout chose, which only "
                             f"rollout.engine=native returns (got {cfg.rollout.engine!r}); use the native "
                             "engine or set grpo.routing_replay=false")
        if not get_spec(cfg.model).expert_parallel:
            raise ValueError(f"grpo.routing_replay=true replays the experts of an MoE policy; model "
                             f"{cfg.model.name!r} has no routed experts: set grpo.routing_replay=false")
    if t.eval_every:
        raise ValueError(f"train.eval_every={t.eval_every}: validation of train.objective=grpo is not "
                         "supported (held-out text has no advantages); set train.eval_every=0")
    from megaqwen.rewards.spec import check_specs

    check_specs(g.rewards, "grpo.rewards")


def grpo_for(cfg) -> Objective:
    """The run's GRPO objective from `cfg.grpo`, after `check_grpo`."""
    check_grpo(cfg)
    return GRPO if cfg.grpo == GRPOConfig() else grpo_objective(cfg.grpo)
