"""Post-training objectives on the objective contract (`megaqwen.train.objective`): `sft` and `dpo`,
registered on import. `objective_for(cfg)` is the run's objective, configured from its section
(`dpo.*`); the trainer step, validation and the pipeline's last stage all get it from there.

SFT (`train.objective=sft`): next-token cross-entropy over the assistant tokens, token-weighted over
the whole step (units = valid labels; the data marks every other token -100), as Qwen2.5's
post-training recipe (technical report sec. 4.1: 32K sequences, lr 7e-6 -> 7e-7, weight decay 0.1,
clip 1.0; conf/recipe/sft-qwen2.5.yaml).

DPO (`train.objective=dpo`, Rafailov et al. 2023, arXiv:2305.18290): rows 2i (chosen, w) and
2i+1 (rejected, l) of every micro-batch are one pair; labels are -100 except on the response. With
per-row sums of log-probabilities over the response, policy pi and frozen reference r:

    delta_i  = (log pi(w) - log pi(l)) - (log r(w) - log r(l))
    sigmoid  : -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)
               (eps = dpo.label_smoothing: conservative DPO, Mitchell 2023; eps = 0 is DPO)
    ipo      : (delta - 1 / (2 beta))^2  (Azar et al. 2023, arXiv:2310.12036 eq. 17), with each
               row's log-probabilities averaged over its response tokens as TRL's DPOTrainer does
               (loss_type="ipo"), so that 1/(2 beta) is on a per-token scale

units = pairs. Metrics (sums over pairs; logged as means per pair): dpo/loss, dpo/rewards_chosen =
beta (log pi(w) - log r(w)), dpo/rewards_rejected, dpo/margin = their difference (= beta delta),
dpo/accuracy = [margin > 0], dpo/logps_chosen, dpo/logps_rejected (policy, summed over the
response; averaged per token under ipo, as the loss uses them). The names follow TRL's
rewards/chosen, rewards/margins, rewards/accuracies, logps/chosen.

Context parallelism: each cp rank holds a shard of every row; `row_sums` all-reduces the shards' sums
(differentiably), so every cp rank computes the whole pair's loss. Each rank reports 1/cp of it:
the step's sums add over dp x cp ranks, and the backward of that all-reduce sums the 1/cp shares
back to one full gradient per shard.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megaqwen.data.pairs import check_pair_rows
from megaqwen.train import grpo, reward  # noqa: F401  (register "grpo" and "reward": a reward model's BT)
from megaqwen.train.objective import (
    LM,
    REFERENCE_FIELD,
    Objective,
    ObjectiveParts,
    cp_size,
    get_objective,
    register_objective,
    row_sums,
)

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig:
    """Direct preference optimisation (`train.objective=dpo`)."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / ref); the IPO regulariser tau."""
    label_smoothing: float = 0.0
    """Sigmoid loss only: probability eps that a preference label is flipped (cDPO); 0 is plain DPO."""
    loss: str = "sigmoid"
    """sigmoid (DPO, with label_smoothing: cDPO) | ipo (squared loss on length-averaged log-ratios)."""
    precompute_reference: bool = False
    """Compute the reference's log-probabilities of every micro-batch of the run before the first
    step and free the reference model (no reference weights during training; host memory: 4 bytes
    per response token of this rank's rows). False runs the reference forward in every step."""


# ---------------------------------------------------------------------------------------------
# SFT


SFT = register_objective(dataclasses.replace(LM, name="sft"))
"""Cross-entropy over the labels that are not -100 (the assistant tokens), mean per token."""


# ---------------------------------------------------------------------------------------------
# DPO

DPO_METRICS = ("dpo/loss", "dpo/rewards_chosen", "dpo/rewards_rejected", "dpo/margin", "dpo/accuracy",
               "dpo/logps_chosen", "dpo/logps_rejected")


def dpo_losses(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
               cfg: DPOConfig) -> torch.Tensor:
    """(P,) per-pair losses from (P,) sequence log-probabilities of chosen (w) and rejected (l)
    responses under the policy and the reference (summed; length-averaged for ipo, by the caller)."""
    delta = (policy_w - policy_l) - (ref_w - ref_l)
    if cfg.loss == "ipo":
        return (delta - 1.0 / (2.0 * cfg.beta)) ** 2
    eps = cfg.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(cfg.beta * delta) - eps * F.logsigmoid(-cfg.beta * delta)


def _dpo_parts(cfg: DPOConfig, model, h: torch.Tensor, batch: dict[str, Any]) -> ObjectiveParts:
    labels = batch["labels"]  # (B, T) this cp rank's shard; rows 2i chosen, 2i+1 rejected
    policy_B = row_sums(model.token_logprobs(h, labels).float(), batch)
    ref_B = row_sums(batch[REFERENCE_FIELD].float(), batch)
    if cfg.loss == "ipo":
        tokens_B = row_sums(torch.ones_like(labels, dtype=torch.float32), batch).clamp(min=1)
        policy_B, ref_B = policy_B / tokens_B, ref_B / tokens_B
    pw, pl, rw, rl = policy_B[0::2], policy_B[1::2], ref_B[0::2], ref_B[1::2]  # (P,) each
    losses_P = dpo_losses(pw, pl, rw, rl, cfg)
    share = 1.0 / cp_size(batch)  # every cp rank holds the whole pair's loss: each reports 1/cp
    with torch.no_grad():
        chosen, rejected = cfg.beta * (pw - rw), cfg.beta * (pl - rl)
        metrics = {"dpo/loss": losses_P.sum(), "dpo/rewards_chosen": chosen.sum(),
                   "dpo/rewards_rejected": rejected.sum(), "dpo/margin": (chosen - rejected).sum(),
                   "dpo/accuracy": (chosen > rejected).float().sum(),
                   "dpo/logps_chosen": pw.sum(), "dpo/logps_rejected": pl.sum()}
        metrics = {k: v * share for k, v in metrics.items()}
    pairs = torch.tensor(labels.shape[0] // 2 * share, device=labels.device)
    return ObjectiveParts(losses_P.sum() * share, pairs, metrics)


def _pairs(batch: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(batch["labels"].shape[0] // 2)


def dpo_objective(cfg: DPOConfig) -> Objective:
    """DPO with these settings (see the module docstring)."""
    return Objective("dpo", lambda model, h, batch: _dpo_parts(cfg, model, h, batch), _pairs,
                     fields=("labels", REFERENCE_FIELD), needs_reference=True, metrics=DPO_METRICS)


DPO = register_objective(dpo_objective(DPOConfig()))
"""DPO with the default settings; a run's own comes from `objective_for(cfg)`."""


# ---------------------------------------------------------------------------------------------
# the run's objective


def check_dpo(cfg) -> None:
    """ValueError naming the setting when a DPO run's config cannot work."""
    d, t = cfg.dpo, cfg.train
    from megaqwen.suggest import check_choice

    check_choice("dpo.loss", d.loss, DPO_LOSSES)
    if not d.beta > 0:
        raise ValueError(f"dpo.beta must be positive, got {d.beta}")
    if not 0 <= d.label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    if d.loss == "ipo" and d.label_smoothing:
        raise ValueError(f"dpo.label_smoothing={d.label_smoothing} applies to dpo.loss=sigmoid only, "
                         "not ipo")
    if t.eval_every:
        raise ValueError(f"train.eval_every={t.eval_every}: validation of train.objective=dpo is not "
                         "supported yet (it needs the reference model's log-probabilities of the held-out "
                         "pairs); set train.eval_every=0")


def objective_for(cfg) -> Objective:
    """The run's objective (`train.objective`), configured from its section of `cfg` (a
    `megaqwen.train.config.Config`): dpo from `cfg.dpo`, grpo from `cfg.grpo` (needs_reference iff
    grpo.kl_coef > 0); lm, sft and user objectives as registered."""
    obj = get_objective(cfg.train.objective)
    reward.check_head(cfg, obj)  # model.head=score <-> train.objective=reward
    if obj is DPO or obj is reward.REWARD:  # rows 2i, 2i + 1 of every micro-batch are one pair
        check_pair_rows(cfg.train.micro_batch_size, f"train.objective={obj.name}")
    if obj is DPO:
        check_dpo(cfg)
        return DPO if cfg.dpo == DPOConfig() else dpo_objective(cfg.dpo)
    if obj is grpo.GRPO:
        return grpo.grpo_for(cfg)
    return obj
