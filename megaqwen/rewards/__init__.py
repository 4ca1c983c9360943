"""Rewards for online RL (GRPO): rule-based verifiers and reward models, combined per config.

    from megaqwen.rewards.combine import Rewards
    from megaqwen.rewards.sample import Sample
    from megaqwen.rewards.spec import RewardSpec

    rewards = Rewards.build([RewardSpec("math", 1.0), RewardSpec("format", 0.1, pattern="boxed")])
    out = rewards([Sample(record={"prompt": "2+3?", "answer": "5"}, completion="\\\\boxed{5}")])
    out.total, out.components, out.means()

Components (`RewardSpec.name`): `math` (math_answer.py: final-answer equivalence to the record's
`answer`), `code` (code.py: the record's `tests` against the completion's last code block in the
sandbox, sandbox.py), `format` (rules.py: a regex / tag check), `rm` (reward_model.py: a score-head
model's reward of prompt + completion), or a user's `package.module:function`. The trainer and the
curation pipeline (`megaqwen-data verify-pairs`) share these verifiers. This package may import the
models, kernels, tokenizer and data layers; never the trainer or the curation pipeline. Importing
the package imports nothing (the verifiers stay free of torch for the curation pipeline).
"""
