"""Routing options of Qwen2-MoE: aux-loss-free bias (DeepSeek-V3), router z-loss, capacity factor."""

import math

import pytest
import torch

from megaqwen.models.config import get_config
from megaqwen.models.qwen2_moe import build_model
from megaqwen.models.qwen2_moe.model import BIAS, router_z_loss
from megaqwen.parallel.expert_parallel import collect_load, update_routing_bias
from megaqwen.train.optim import param_groups

SMALL = dict(hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=64)


def _skewed(rate: float, seed=0):
    """A model whose routers send most tokens to experts 0 and 1 (inputs with a positive mean
    meet router rows 0-1 shifted up)."""
    torch.manual_seed(seed)
    model = build_model(get_config("debug-moe", moe_routing_bias_update_rate=rate, **SMALL))
    with torch.no_grad():
        for block in model.moe_blocks().values():
            block.gate.weight[:2] += 0.02
    return model


def _imbalance(loads) -> float:
    """max / mean expert load, worst layer."""
    return max((ld.load_E.max() / ld.load_E.mean()).item() for ld in loads.values())


def test_aux_free_bias_balances_a_skewed_router():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(256, SMALL["hidden_size"], generator=g) + 1.0 for _ in range(40)]
    curves = {}
    for rate in (0.0, 0.01):
        model = _skewed(rate)
        curve = []
        for x in xs:  # one "step": forward of every sparse layer, then the update
            with torch.no_grad():
                for block in model.moe_blocks().values():
                    block(x[None])
            loads = collect_load(model)
            update_routing_bias(model, loads, rate)
            curve.append(_imbalance(loads))
        curves[rate] = curve
    off, on = curves[0.0], curves[0.01]
    assert off[0] == on[0] > 2.0  # same skewed start
    assert sum(on[-5:]) / 5 < 0.5 * on[0]  # the bias evens the load out
    assert sum(off[-5:]) / 5 > 0.9 * off[0]  # without it nothing changes
    bias = _skewed(0.01).moe_blocks()["model.layers.1.mlp"].routing_bias
    assert bias is not None and not bias.any()  # starts at zero


def test_bias_picks_experts_but_weights_stay_unbiased():
    model = _skewed(0.01)
    block = model.moe_blocks()["model.layers.1.mlp"]
    x = torch.randn(7, SMALL["hidden_size"])
    with torch.no_grad():
        block.routing_bias.copy_(torch.tensor([-1.0, -1, 0, 0, 0, 0, 0, 1]))  # bar 0, 1; favour 7
        routing, w = block.route(x)
    assert (routing.topk_NK[:, 0] == 7).all() and not torch.isin(routing.topk_NK, torch.tensor([0, 1])).any()
    torch.testing.assert_close(w, routing.probs_NE.gather(1, routing.topk_NK))


def test_bias_is_a_checkpointed_parameter_without_grad():
    model = _skewed(0.01)
    name = f"model.layers.1.mlp.gate.{BIAS}"
    assert name in model.state_dict()
    p = model.get_parameter(name)
    assert not p.requires_grad
    assert all(p is not q for grp in param_groups(model, 0.1) for q in grp["params"])  # no optimizer
    assert f"model.layers.1.mlp.gate.{BIAS}" not in _skewed(0.0).state_dict()  # off: no key (stock HF)
    tokens = torch.randint(0, 64, (2, 9))
    model(tokens, tokens).mean().backward()
    assert p.grad is None


def test_router_z_loss():
    torch.manual_seed(0)
    model = build_model(get_config("debug-moe", **SMALL))
    tokens = torch.randint(0, 64, (2, 11))
    routing = []
    h = model.hidden_states(tokens, torch.arange(11).expand(2, 11), None, records=routing)
    parts = model(tokens, tokens)
    assert len(routing) == 2
    # by hand from each sparse layer's router input
    inputs = []
    hooks = [b.gate.register_forward_hook(lambda m, a, o: inputs.append(o))
             for b in model.moe_blocks().values()]
    model(tokens, tokens)
    for hk in hooks:
        hk.remove()
    want = torch.cat([torch.logsumexp(o.float(), -1).square() for o in inputs]).mean()
    torch.testing.assert_close(parts.z, want)
    torch.testing.assert_close(router_z_loss(routing), want)
    assert h.shape == (2, 11, SMALL["hidden_size"])
    parts.z.backward()  # reaches the routers and what feeds them, not the last layer's experts
    assert model.model.layers["1"].mlp.gate.weight.grad.abs().sum() > 0
    last = model.model.layers["3"].mlp
    assert all(p.grad is None or not p.grad.any() for p in last.experts.parameters())
    assert model.model.norm.weight.grad is None


def test_capacity_factor_drops_and_counts():
    model = _skewed(0.0)
    block = model.moe_blocks()["model.layers.1.mlp"]
    block.capacity_factor = 1.0
    x = torch.randn(40, SMALL["hidden_size"]) + 1.0
    with torch.no_grad():
        routing, w = block.route(x)
        got = block.experts_forward(x, routing.topk_NK, w)
    n, k, e = 40, block.top_k, block.num_experts
    cap = math.ceil(1.0 * n * k / e)
    counts = torch.bincount(routing.topk_NK.reshape(-1), minlength=e)
    assert block.dropped.item() == (counts - cap).clamp(min=0).sum().item() > 0
    assert torch.equal(block.load_E, counts)
    # reference: each expert keeps its first `cap` assignments in token order
    seen = [0] * e
    ref = torch.zeros_like(x)
    with torch.no_grad():
        for t in range(n):
            for j in range(k):
                ex = int(routing.topk_NK[t, j])
                if seen[ex] < cap:
                    ref[t] += w[t, j] * block.experts[str(ex)](x[t])
                seen[ex] += 1
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_capacity_config_is_validated():
    with pytest.raises(ValueError, match="moe_capacity_factor=-1 must be >= 0"):
        get_config("debug-moe", moe_capacity_factor=-1)
