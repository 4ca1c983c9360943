"""What a model hands the generic trainer besides its hidden states: named auxiliary loss terms.

A model's forward may add terms to the objective that are not the task's loss (Qwen2-MoE's router
load-balancing and z-losses today). It reports them by name, each with its coefficient, and the
objective code (`megaqwen.train.objective`) adds `coef * value` to the step's objective, logs
`value` under the name and reduces it over micro-batches, data-parallel and pipeline ranks in one
place. The trainer never knows which architecture contributed what.

Under pipeline parallelism a stage computes only its own layers' share of each term
(`Qwen2ForCausalLM.aux_terms(records, partial=True)`): the shares of all stages add up to the
whole-model value (a sum over layers divided by a constant, like the z-loss). A term whose factors
span more than one forward (HF's load-balancing loss multiplies counts pooled over every layer; the
global-batch form counts over the whole step) is linear in this forward's router probabilities once
those counts are fixed: the trainer hands them in from a counting pre-pass (`megaqwen.models.
moe_balance`, `megaqwen.train.moe_balance`), so each stage's, shard's and micro-batch's share is exact.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AuxTerm(NamedTuple):
    """One auxiliary term of one forward (micro-batch) or of one stage's share of it."""

    value: torch.Tensor
    """fp32 scalar with grad: the term as logged (a mean over its units)."""
    coef: float
    """Its weight in the objective (0: logged, not trained on)."""


class ForwardOut(NamedTuple):
    """A forward run for an objective (`model(..., objective=obj, batch=b)`)."""

    parts: object
    """What the objective returned for this micro-batch (`megaqwen.train.objective.ObjectiveParts`)."""
    aux: dict[str, AuxTerm]
    """The model's named auxiliary terms of this forward (empty for a dense model)."""


ROUTED_EXPERTS = "routed_experts"
"""Batch field (B, T, num_layers, K) int: the experts each sparse layer routes each token to (routing
replay, `grpo.routing_replay`), -1 where the router chooses (dense layers, padding, positions the
rollout never fed). A model with experts replays it in every forward whose batch carries it; a dense
model has no such field to read."""
