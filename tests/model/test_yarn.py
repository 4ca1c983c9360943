"""YaRN RoPE scaling against transformers: frequencies, attention factor, and whole-model logits."""

import dataclasses
import math
import random

import pytest
import torch
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megaqwen.convert.hf import config_from_hf
from megaqwen.kernels.rope import yarn_inv_freq
from megaqwen.models import build_model
from megaqwen.models.config import get_config


def _hf_yarn(head_dim, theta, params, max_pos=131_072):
    cfg = Qwen2Config(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta,
                      max_position_embeddings=max_pos,
                      rope_scaling={"type": "yarn", **params})
    return ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")


def _cases():
    # Qwen2.5's recommended setting (config.json of the 7B/72B-Instruct model cards), then random ones
    yield 128, 1e6, dict(factor=4.0, original_max_position_embeddings=32_768)
    rng = random.Random(0)
    for _ in range(6):
        params = dict(factor=rng.choice([1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0]),
                      original_max_position_embeddings=rng.choice([256, 4096, 32_768, 65_536]))
        if rng.random() < 0.5:
            params.update(beta_fast=rng.choice([16.0, 32.0, 64.0]), beta_slow=rng.choice([0.5, 1.0, 2.0]))
        yield rng.choice([16, 64, 80, 128]), rng.choice([1e4, 1e6, 1e7]), params


@pytest.mark.parametrize("head_dim,theta,params", list(_cases()))
def test_yarn_frequencies_and_attention_factor_equal_transformers(head_dim, theta, params):
    want, want_factor = _hf_yarn(head_dim, theta, params)
    got, got_factor = yarn_inv_freq(head_dim, theta, params["factor"],
                                    params["original_max_position_embeddings"],
                                    params.get("beta_fast", 32.0), params.get("beta_slow", 1.0))
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)  # same expressions, same bits
    assert got_factor == pytest.approx(want_factor, rel=1e-12)
    if params["factor"] > 1:
        assert got_factor == pytest.approx(0.1 * math.log(params["factor"]) + 1)


def test_explicit_attention_factor_is_used():
    want, want_factor = _hf_yarn(64, 1e6, dict(factor=4.0, original_max_position_embeddings=4096,
                                               attention_factor=1.3))
    got, got_factor = yarn_inv_freq(64, 1e6, 4.0, 4096, attention_factor=1.3)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
    assert got_factor == want_factor == 1.3


def test_yarn_logits_equal_transformers():
    """fp32 logits of a random-weight Qwen2 with yarn rope_scaling, over positions past the original
    context (original 16, factor 4, T 57), equal transformers' Qwen2ForCausalLM."""
    hc = Qwen2Config(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
                     max_position_embeddings=64, tie_word_embeddings=False,
                     rope_scaling={"type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    hf = HFQwen2(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)  # large enough that RoPE moves the logits
    cfg = config_from_hf(hf.config.to_dict())
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_position) == ("yarn", 4.0, 16)
    ours = build_model(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    tokens = torch.randint(0, 211, (2, 57), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(tokens).logits, ours(tokens)
        plain = build_model(dataclasses.replace(cfg, rope_scaling="none")).eval()
        plain.load_state_dict(hf.state_dict(), strict=True)
        unscaled = plain(tokens)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-4 * max(scale, 1.0), scale
    assert (unscaled - ref).abs().max().item() > 0.05 * scale  # yarn moves the logits: the test can fail


def test_yarn_config_validation_names_the_values():
    with pytest.raises(ValueError, match="rope_original_max_position"):
        get_config("debug", rope_scaling="yarn", rope_scaling_factor=4.0)
    with pytest.raises(ValueError, match="rope_scaling='ntk'"):
        get_config("debug", rope_scaling="ntk")
    with pytest.raises(ValueError, match="rope_scaling_factor=0.5"):
        get_config("debug", rope_scaling="yarn", rope_scaling_factor=0.5, rope_original_max_position=8)
