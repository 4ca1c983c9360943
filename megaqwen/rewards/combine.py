"""The run's reward: its components (`RewardSpec`s) scored on a batch of samples and summed with their
weights.

    rewards = Rewards.build(cfg.grpo.rewards)           # loads reward models once
    out = rewards(samples)                              # RewardBatch
    out.total          # (N,) fp32: sum_k weight_k * component_k (0 where a component does not apply)
    out.components     # label -> (N,) fp32 raw component values (unweighted; NaN where it does not apply)
    out.means()        # label -> mean over the samples it applies to, and "total"

A component may not apply to a sample (maths to a code record: no `answer`); a sample to which no
component applies is an error naming it (its reward would silently be 0).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megaqwen.rewards.sample import Sample
from megaqwen.rewards.spec import RewardSpec, check_specs

Component = Callable[[list[Sample]], list]
"""samples -> one float (or None: does not apply) per sample."""


@dataclass(frozen=True)
class RewardBatch:
    total: torch.Tensor
    """(N,) fp32 weighted sum of the components."""
    components: dict[str, torch.Tensor]
    """label -> (N,) fp32 unweighted values, NaN where the component does not apply."""

    def means(self) -> dict[str, float]:
        """label -> mean over the samples the component applies to (NaN when none), plus `total`."""
        out = {}
        for k, v in self.components.items():
            ok = ~torch.isnan(v)
            out[k] = v[ok].mean().item() if bool(ok.any()) else math.nan
        out["total"] = self.total.mean().item() if self.total.numel() else math.nan
        return out


def component(spec: RewardSpec) -> Component:
    """The scoring function of one spec (a reward model is loaded here, once)."""
    if spec.name == "math":
        from megaqwen.rewards.rules import math_reward

        return math_reward
    if spec.name == "format":
        from megaqwen.rewards.rules import format_reward

        return lambda samples: format_reward(samples, spec.pattern)
    if spec.name == "code":
        from megaqwen.rewards.code import code_reward

        return lambda samples: code_reward(samples, spec.timeout_s, spec.workers)
    if spec.name == "rm":
        from megaqwen.rewards.reward_model import RewardModel

        return RewardModel.load(spec.path, spec.tokenizer or None, spec.device, spec.batch_size).score
    module, _, attr = spec.name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {spec.name}: cannot import it ({e})") from e
    if not callable(fn):
        raise ValueError(f"reward {spec.name} is a {type(fn).__name__}, not a function of the samples")
    return fn


class Rewards:
    """Weighted reward components (see the module docstring)."""

    def __init__(self, parts: list[tuple[RewardSpec, Component]]):
        self.parts = parts

    @classmethod
    def build(cls, specs: list[RewardSpec], where: str = "grpo.rewards") -> Rewards:
        check_specs(specs, where)
        return cls([(s, component(s)) for s in specs])

    @property
    def labels(self) -> list[str]:
        return [s.key for s, _ in self.parts]

    def __call__(self, samples: list[Sample]) -> RewardBatch:
        n = len(samples)
        total = torch.zeros(n, dtype=torch.float32)
        applied = torch.zeros(n, dtype=torch.bool)
        components = {}
        for spec, fn in self.parts:
            values = list(fn(samples))
            if len(values) != n:
                raise ValueError(f"reward {spec.key} returned {len(values)} values for {n} samples")
            v = torch.tensor([math.nan if x is None else float(x) for x in values], dtype=torch.float32)
            ok = ~torch.isnan(v)
            components[spec.key] = v
            total += spec.weight * torch.where(ok, v, 0.0)
            applied |= ok
        if n and not bool(applied.all()):
            i = int((~applied).nonzero()[0])
            raise ValueError(f"no reward component ({', '.join(self.labels)}) applies to sample {i} (record "
                             f"keys {sorted(samples[i].record)}): maths needs 'answer', code 'tests'")
        return RewardBatch(total, components)
