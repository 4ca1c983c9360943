"""Stage-friendly forward (hidden states / logits / LossParts), layout-independent init, model spec."""

from __future__ import annotations

import pytest
import torch

from megaqwen.kernels.attention import AttentionMeta
from megaqwen.kernels.cross_entropy import IGNORE_INDEX, LossParts
from megaqwen.models import build_model, get_config
from megaqwen.models.qwen2 import ParamInit
from megaqwen.models.spec import get_spec
from megaqwen.parallel.init import TILE, fill_box


def _model(**kw):
    return build_model(get_config("debug", vocab_size=97, **kw), seed=3)


def test_loss_parts_reduce_exactly_over_any_split():
    model = _model()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (4, 9), generator=g)
    labels = torch.randint(0, 97, (4, 9), generator=g)
    labels[0, :7] = IGNORE_INDEX  # uneven valid tokens per row: mean of means would be wrong
    whole = model(tokens, labels=labels)
    assert isinstance(whole, LossParts) and int(whole.count) == 36 - 7
    parts = [model(tokens[i:i + 1], labels=labels[i:i + 1]) for i in range(4)]
    total = sum(p.sum for p in parts) / sum(p.count for p in parts)
    torch.testing.assert_close(total, whole.mean(), rtol=1e-6, atol=0)
    mean_of_means = torch.stack([p.mean() for p in parts]).mean()
    assert abs(mean_of_means - whole.mean()) > 1e-3  # the split the old reduction got wrong


def test_separate_steps_compose_to_forward():
    model = _model()
    tokens = torch.randint(0, 97, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    docs = torch.tensor([[0] * 3 + [1] * 5, [0] * 8])
    meta = AttentionMeta(docs)
    h = model.hidden_states(tokens, pos, meta)
    torch.testing.assert_close(model.logits(h), model(tokens, position_ids=pos, document_ids=docs))
    loss = model.loss(h, tokens)
    torch.testing.assert_close(loss.mean(), model(tokens, labels=tokens, position_ids=pos,
                                                  document_ids=meta).mean())


def test_stage_without_norm_returns_hidden_and_needs_positions():
    model = _model()
    tokens = torch.randint(0, 97, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    h_in = model.model.embed_tokens(tokens)
    model.model.embed_tokens = None  # a middle pipeline stage: no embedding, no final norm
    model.model.norm = None
    out = model(h_in, position_ids=pos)
    assert out.shape == (2, 8, 64)
    with pytest.raises(ValueError, match="position_ids are required"):
        model(h_in)


def test_any_box_of_a_parameter_equals_the_same_slice_of_the_full_draw():
    full_shape = (TILE[0] * 2 + 37, TILE[1] + 300)  # crosses tile edges in both dims
    init = ParamInit("normal", 0.02)
    full = torch.empty(full_shape)
    fill_box(full, init, 5, "w", full_shape, [(0, n) for n in full_shape])
    assert abs(full.std().item() - 0.02) < 1e-3
    boxes = ([(100, 540), (0, full_shape[1])], [(0, full_shape[0]), (1000, 1200)], [(255, 257), (1023, 1025)])
    for box in boxes:
        piece = torch.empty([b - a for a, b in box], dtype=torch.bfloat16)
        fill_box(piece, init, 5, "w", full_shape, box)
        want = full[box[0][0]:box[0][1], box[1][0]:box[1][1]].bfloat16()
        assert torch.equal(piece, want), box
    other = torch.empty(full_shape)
    fill_box(other, init, 5, "w2", full_shape, [(0, n) for n in full_shape])
    assert not torch.equal(other, full)  # seeded per parameter name
    with pytest.raises(ValueError, match=r"box \[\(0, 600\), \(0, 1324\)\] is outside"):
        fill_box(torch.empty(600, 1324), init, 5, "w", full_shape, [(0, 600), (0, 1324)])
    with pytest.raises(ValueError, match="does not match its box"):
        fill_box(torch.empty(3, 3), init, 5, "w", full_shape, [(0, 4), (0, 3)])


def test_same_seed_same_weights_and_init_rules():
    a, b = _model(), _model()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    sd = a.state_dict()
    assert torch.equal(sd["model.norm.weight"], torch.ones(64))
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.bias"], torch.zeros(64))
    assert abs(sd["model.embed_tokens.weight"].std().item() - 0.02) < 2e-3


def test_spec_registry():
    spec = get_spec(get_config("debug"))
    assert spec.arch == "qwen2" and get_spec("qwen2") is spec
    model = spec.build(get_config("debug"), device="meta")
    assert list(spec.layers(model)) == ["0", "1"]
    with pytest.raises(ValueError, match="unknown model architecture 'mamba'"):
        get_spec("mamba")
