"""A user reward for the rollout tests (`grpo.rewards` name `rollout_rewards:parity`): 1.0 when the
completion's first token id is odd. An untrained model's completions rarely hold a right sum, so the
maths reward alone would give every group equal rewards (zero advantages, a zero loss); this one
varies within groups, so the tests' GRPO steps have a non-zero loss and gradient."""


def parity(samples) -> list[float]:
    return [float(bool(s.token_ids) and s.token_ids[0] % 2 == 1) for s in samples]
