"""Next-token choice from (B, V) logits: greedy, or temperature / top-k / top-p sampling.

Every rank of a tensor-parallel group calls this with the same gathered logits and an identically
seeded generator, so every rank draws the same tokens without a broadcast.
"""

from __future__ import annotations

import torch

from megaqwen.generate.api import SamplingParams


def filter_logits(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Tempered logits with the tokens outside top-k / top-p set to -inf (fp32)."""
    x = logits_BV.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = x.topk(params.top_k, dim=-1).values[..., -1:]  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, idx = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= params.top_p  # the most likely token is always kept (before = 0)
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted), float("-inf"))
    return x


def sample_next(logits_BV: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> next tokens (B,) int64 and their log-probs (B,) fp32 under log_softmax(logits) (temperature
    1, unfiltered: see `Completion.logprobs`)."""
    logits = logits_BV.float()
    if params.is_greedy:
        tokens = logits.argmax(-1)
    else:
        probs = filter_logits(logits, params).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    logp = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logp
