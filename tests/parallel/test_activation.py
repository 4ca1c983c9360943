"""Recomputation and compile keep the losses (one process), keep parameter names, reject bad modes."""

from __future__ import annotations

import pytest
import torch

from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.activation import apply_compile, apply_recompute
from megaqwen.parallel.materialize import materialize
from megaqwen.parallel.shards import ShardMap

CFG = dict(vocab_size=256, num_layers=3)


def _losses(recompute: str = "none", compile_: bool = False, steps: int = 3):
    cfg = get_config("debug", **CFG)
    spec = get_spec(cfg)
    model = spec.build(cfg, device="meta")
    names = [n for n, _ in model.named_parameters()]
    apply_recompute(spec.layers(model), recompute, spec.selective_recompute)
    if compile_:
        apply_compile(spec.layers(model))
    materialize(model, ShardMap(), "cpu", seed=11)
    assert [n for n, _ in model.named_parameters()] == names  # no wrapper prefixes
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (steps, 2, 33), generator=g)
    docs = torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
    out = []
    for s in range(steps):
        loss = model(ids[s, :, :-1], labels=ids[s, :, 1:], document_ids=docs).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out, model


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_identical_losses(mode):
    ref, _ = _losses()
    got, model = _losses(mode)
    assert got == ref  # the same kernels re-run on the same inputs: bit-identical on CPU
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("RecomputeAttention" if mode == "selective" else "RecomputeDecoderLayer") in kinds


def test_recompute_mode_is_checked():
    cfg = get_config("debug", **CFG)
    spec = get_spec(cfg)
    want = r"parallel.recompute='some'; choose from \('none', 'selective', 'full'\)"
    with pytest.raises(ValueError, match=want):
        apply_recompute(spec.layers(spec.build(cfg, device="meta")), "some", spec.selective_recompute)


@pytest.mark.slow
def test_compile_matches_eager():
    ref, _ = _losses()
    got, _ = _losses(compile_=True)
    for a, b in zip(got, ref):
        assert abs(a - b) / abs(b) <= 1e-5, (got, ref)
    got_rc, _ = _losses("full", compile_=True)
    for a, b in zip(got_rc, ref):
        assert abs(a - b) / abs(b) <= 1e-5, (got_rc, ref)
