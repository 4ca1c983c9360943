"""megaqwen's Qwen2.5 model against transformers' Qwen2ForCausalLM on the same random weights."""

import pytest
import torch
from hf_random import assert_logits_match
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2

from megaqwen.convert.hf import config_from_hf
from megaqwen.models import build_model

CASES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied, rope_theta)
    "gqa_tied": (64, 176, 2, 4, 2, 311, True, 10_000.0),
    "mha_untied": (48, 100, 3, 4, 4, 257, False, 1_000_000.0),
    "mqa_odd": (72, 130, 2, 6, 1, 199, False, 500_000.0),
    "gqa_7_to_1_like": (56, 90, 1, 7, 1, 101, True, 10_000.0),
}


def _hf_model(case, seed=0):
    h, i, n, heads, kv, vocab, tied, theta = CASES[case]
    hc = Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                     num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                     rope_theta=theta, max_position_embeddings=512, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    hf = HFQwen2(hc).eval()
    with torch.no_grad():  # randomise everything, biases and norm weights included
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
    return hf


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    ours = build_model(cfg).eval()
    sd = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    ours.load_state_dict(sd, strict=True)
    assert_logits_match(hf, ours, cfg.vocab_size)


def test_loss_and_grads_match_transformers():
    hf = _hf_model("mha_untied").train()
    cfg = config_from_hf(hf.config.to_dict())
    ours = build_model(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    ref_loss = hf(tokens, labels=tokens).loss  # HF shifts internally
    ref_loss.backward()
    loss = ours(tokens[:, :-1], labels=tokens[:, 1:]).mean()
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_position_ids_offset_matches_transformers():
    """Explicit (non-zero-based) position ids go through RoPE exactly as in transformers."""
    hf = _hf_model("gqa_tied")
    cfg = config_from_hf(hf.config.to_dict())
    ours = build_model(cfg).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    tokens = torch.randint(0, cfg.vocab_size, (1, 17))
    pos = torch.arange(100, 117)[None]
    with torch.no_grad():
        assert (ours(tokens, position_ids=pos) - hf(tokens, position_ids=pos).logits).abs().max() <= 1e-4


def test_packed_documents_equal_separate_runs():
    """Position reset + document mask: a packed row equals its documents run one by one."""
    hf = _hf_model("gqa_tied")
    cfg = config_from_hf(hf.config.to_dict())
    model = build_model(cfg).eval()
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    lens = [5, 9, 3]
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lens]
    tokens = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    with torch.no_grad():
        packed = model(tokens, position_ids=pos, document_ids=doc_ids)[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
    assert (packed - separate).abs().max() <= 1e-5
