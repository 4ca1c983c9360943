"""What a run's reward is made of: a list of `RewardSpec`, each one component with a weight.

    grpo.rewards: [{name: math, weight: 1.0}, {name: format, weight: 0.1},
                   {name: rm, path: runs/rm/checkpoints, weight: 0.5, label: helpful}]

The reward of a sample is sum_k weight_k * component_k (`megaqwen.rewards.combine.Rewards`); every
component is also reported per sample under its `label` (default: its name).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

KINDS = ("math", "code", "format", "rm")
"""Built-in components: math (answer equivalence to the record's `answer`), code (the record's `tests`
in the sandbox), format (the completion matches `pattern`), rm (a reward model's score)."""

FORMAT_PRESETS = {
    "boxed": r"\\boxed\{.+\}",
    "answer_tag": r"<answer>.+?</answer>",
    "think_answer": r"^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$",
}
"""format's named patterns (any other `pattern` is a regular expression, searched with DOTALL)."""


@dataclass
class RewardSpec:
    """One reward component of the run's reward (`grpo.rewards`)."""

    name: str = "math"
    """math | code | format | rm, or `package.module:function` (a user's fn(samples) -> list[float])."""
    weight: float = 1.0
    """Weight of this component in the total reward."""
    label: str = ""
    """Name the component is reported under (default: name); labels must be unique."""
    path: str = ""
    """rm: the reward model, a native checkpoint (run folder) or an HF SequenceClassification folder."""
    tokenizer: str = ""
    """rm: tokenizer folder for rendering prompt + completion (default: `path` when it holds
    tokenizer.json, else the shipped Qwen2.5 tokenizer)."""
    pattern: str = "boxed"
    """format: boxed | answer_tag | think_answer, or a regular expression the completion must match."""
    timeout_s: float = 5.0
    """code: wall-clock seconds per sandboxed check."""
    workers: int = 4
    """code: sandboxed checks run at a time."""
    batch_size: int = 8
    """rm: samples scored per forward."""
    device: str = "auto"
    """rm: auto (cuda when available) | cpu | cuda."""

    @property
    def key(self) -> str:
        """The name the component is reported under."""
        return self.label or self.name

    def __str__(self) -> str:
        """As an override spells it: name, weight and the fields that differ from their defaults
        (`{name: math, weight: 1.0}`; `megaqwen-train --help` prints this)."""
        default = RewardSpec()
        kept = [f.name for f in fields(self) if f.name in ("name", "weight")
                or getattr(self, f.name) != getattr(default, f.name)]
        return "{" + ", ".join(f"{k}: {getattr(self, k)}" for k in kept) + "}"


def check_specs(specs: list[RewardSpec], where: str = "rewards") -> None:
    """ValueError naming the entry when a list of reward components cannot work."""
    if not specs:
        raise ValueError(f"{where} is empty: name at least one reward component ({' | '.join(KINDS)})")
    from megaqwen.suggest import check_choice

    seen = set()
    for i, s in enumerate(specs):
        at = f"{where}[{i}]"
        if ":" not in s.name:
            check_choice(f"{at}.name", s.name, KINDS)
        if s.key in seen:
            raise ValueError(f"{at}: two components are reported as {s.key!r}; give one a distinct label")
        seen.add(s.key)
        if s.name == "rm" and not s.path:
            raise ValueError(f"{at}: name=rm needs path (a reward-model checkpoint or HF folder)")
        if s.name == "code" and (s.timeout_s <= 0 or s.workers < 1):
            raise ValueError(f"{at}: code needs timeout_s > 0 and workers >= 1, got {s.timeout_s} and "
                             f"{s.workers}")
        if s.name == "rm" and s.batch_size < 1:
            raise ValueError(f"{at}: batch_size must be >= 1, got {s.batch_size}")
        if s.name == "format":
            import re

            try:
                re.compile(FORMAT_PRESETS.get(s.pattern, s.pattern))
            except re.error as e:
                raise ValueError(f"{at}: pattern {s.pattern!r} is not a regular expression ({e})") from e
