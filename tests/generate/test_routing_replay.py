"""Routing replay (grpo.routing_replay) for MoE policies: the native engine records the experts every
sparse layer chose for each token it fed, and a forward whose batch carries them routes each token to
those experts with the current router's weights at them. Each checked against the plain computation:
the full-sequence forward's own routing, and the block's output written out per token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaqwen.generate import SamplingParams, build_engine
from megaqwen.models.config import get_config
from megaqwen.models.outputs import ROUTED_EXPERTS
from megaqwen.models.spec import get_spec

PROMPTS = [[5, 17, 3, 99, 42, 8, 1], [7, 9], [11, 12, 13, 14]]  # different lengths: left padding
NEW = 5


def _model(name="debug-moe", **kw):
    cfg = get_config(name, vocab_size=256, **kw)
    return get_spec(cfg).build(cfg, dtype=torch.float64, seed=0)  # fp64: no near-ties between paths


def _free_routing(model, tokens: list[int]) -> dict[int, torch.Tensor]:
    """layer -> (T, K) experts the full-sequence forward (no cache, no replay) chooses."""
    records = []
    with torch.no_grad():
        t = torch.tensor([tokens])
        model.replay_routing(None)
        model.hidden_states(t, torch.arange(len(tokens))[None], records=records)
    return {r.layer: r.topk_NK for r in records}


@pytest.mark.parametrize("name", ["debug-moe", "debug-qwen3-moe"])
def test_engine_records_the_experts_the_full_forward_chooses(name):
    model = _model(name)
    cfg = model.cfg
    sparse = [i for i in range(cfg.num_layers) if cfg.is_sparse_layer(i)]
    engine = build_engine("native", model)
    for params in (SamplingParams(max_new_tokens=NEW, greedy=True, return_routed_experts=True),
                   SamplingParams(max_new_tokens=NEW, temperature=1.0, seed=3, return_routed_experts=True,
                                  stop_token_ids=tuple(range(0, 256, 3)))):  # a third of the tokens stop
        outs = engine.generate(PROMPTS, params)
        for o in outs:
            fed = o.prompt_ids + o.token_ids[:-1]  # the last generated token is never fed
            routed = o.routed_experts
            assert routed.dtype == torch.int16
            assert routed.shape == (len(fed), cfg.num_layers, cfg.num_experts_per_tok)
            free = _free_routing(model, fed)
            assert sorted(free) == sparse
            for layer in range(cfg.num_layers):
                if layer in free:
                    assert torch.equal(routed[:, layer].long().sort(-1).values, free[layer].sort(-1).values)
                else:
                    assert (routed[:, layer] == -1).all()  # a dense layer routes nothing
        if not params.is_greedy:
            assert any(o.finish_reason == "stop" for o in outs)  # rows that ended early are covered
    assert engine.generate(PROMPTS, SamplingParams(max_new_tokens=2, greedy=True))[0].routed_experts is None


def test_a_dense_model_is_refused():
    cfg = get_config("debug", vocab_size=256)
    engine = build_engine("native", get_spec(cfg).build(cfg, seed=0))
    with pytest.raises(ValueError, match="has no MoE routing to return"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2, greedy=True, return_routed_experts=True))


@pytest.mark.parametrize("name", ["debug-moe", "debug-qwen3-moe"])
def test_replayed_block_equals_the_formula_per_token(name):
    """y[n] = sum_k w[n, k] expert_{e[n, k]}(x[n]) (+ the shared expert), e = the replayed experts
    (the router's top-k where -1), w = softmax(router logits)[n, e] (renormalised with
    norm_topk_prob): output and the router's gradient."""
    model = _model(name)
    block = next(iter(model.moe_blocks().values()))
    e, k = model.cfg.num_experts, model.cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, model.cfg.hidden_size, generator=g, dtype=torch.float64)
    replay = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(12)])
    replay[[2, 7]] = -1  # these tokens route freely
    block.routing_replay = replay
    y = block(x)
    gate_grad, = torch.autograd.grad(y.square().sum(), block.gate.weight)

    xs = x.reshape(-1, x.shape[-1])
    probs = F.softmax(block.gate(xs).float(), dim=-1)  # the router computes in fp32
    ref = []
    for n in range(xs.shape[0]):
        idx = replay[n] if replay[n, 0] >= 0 else probs[n].topk(k).indices
        w = probs[n, idx]
        if model.cfg.norm_topk_prob:
            w = w / w.sum()
        w = w.to(xs.dtype)
        yn = sum(w[j] * block.experts[str(int(idx[j]))](xs[n:n + 1])[0] for j in range(k))
        if block.shared_expert is not None:
            xn = xs[n:n + 1]
            yn = yn + torch.sigmoid(block.shared_expert_gate(xn))[0] * block.shared_expert(xn)[0]
        ref.append(yn)
    ref = torch.stack(ref).view_as(y)
    ref_grad, = torch.autograd.grad(ref.square().sum(), block.gate.weight)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gate_grad, ref_grad, rtol=1e-6, atol=1e-9)  # through the fp32 softmax
    assert gate_grad.abs().sum() > 0  # the router still learns under replay
    block.routing_replay = replay[:5]
    with pytest.raises(ValueError, match="routing replay of layer"):
        block(x)


def test_a_moved_router_is_replayed_by_the_forward_that_carries_the_routing():
    """After an update that moves the router, a forward whose batch carries the rollout's routing
    routes as the rollout did (not as the moved router would) and gives the log-probs of that
    routing; a forward without the field routes freely again."""
    model = _model()
    cfg = model.cfg
    out = build_engine("native", model).generate(PROMPTS[:1], SamplingParams(max_new_tokens=NEW, greedy=True,
                                                                           return_routed_experts=True))[0]
    fed = out.prompt_ids + out.token_ids[:-1]
    before = _free_routing(model, fed)
    with torch.no_grad():  # "an update": move every router
        for block in model.moe_blocks().values():
            g = torch.Generator().manual_seed(1)
            block.gate.weight.add_(torch.randn(block.gate.weight.shape, generator=g, dtype=torch.float64))
    after = _free_routing(model, fed)
    assert any(not torch.equal(before[i], after[i]) for i in before), "the routing did not move: no test"

    tokens = torch.tensor([fed + out.token_ids[-1:]])
    routed = torch.full((1, tokens.shape[1], cfg.num_layers, cfg.num_experts_per_tok), -1, dtype=torch.int16)
    routed[0, :len(fed)] = out.routed_experts  # the last token routes freely (-1)
    labels = torch.full_like(tokens, -100)
    labels[0, len(out.prompt_ids) - 1:-1] = torch.tensor(out.token_ids)
    whole = _free_routing(model, tokens[0].tolist())  # the moved router's own choices, last token too

    def logprobs(m, h, batch):
        return m.token_logprobs(h, labels)

    def sorted_(t):
        return t.long().sort(-1).values

    with torch.no_grad(), model.recording_routing() as tape:
        replayed = model(tokens, objective=logprobs, batch={ROUTED_EXPERTS: routed}).parts
        seen = dict(tape)
        tape.clear()
        free = model(tokens, objective=logprobs, batch={}).parts  # no field: routes freely again
        seen_free = dict(tape)
    assert sorted(seen) == sorted(before)
    for layer in before:
        assert torch.equal(sorted_(seen[layer][:len(fed)]), sorted_(before[layer]))  # the rollout's
        assert torch.equal(sorted_(seen[layer][len(fed):]), sorted_(whole[layer][len(fed):]))
        assert torch.equal(sorted_(seen_free[layer]), sorted_(whole[layer]))
    assert not torch.allclose(replayed[labels != -100], free[labels != -100])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_replays_the_routing_its_forward_replayed(mode):
    """parallel.recompute re-runs each layer's forward in backward: that re-run routes as the forward
    did (the rollout's experts, not the router's own choice), so the gradients equal those of the same
    replayed forward without recompute, to fp64 rounding."""
    import copy

    from megaqwen.parallel.activation import apply_recompute

    model = _model()
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    routed = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.num_experts_per_tok]
                          for _ in range(2 * 9 * cfg.num_layers)])
    routed = routed.view(2, 9, cfg.num_layers, -1).to(torch.int16)
    routed[0, 4:] = -1  # half a row routes freely
    free = _free_routing(model, tokens[0].tolist())
    assert any(not torch.equal(routed[0, :4, i].long().sort(-1).values, free[i][:4].sort(-1).values)
               for i in free), "the replay equals the free routing: no test"

    def grads(m, replay: bool) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        lp = m(tokens, objective=lambda mm, h, b: mm.token_logprobs(h, labels),
               batch={ROUTED_EXPERTS: routed} if replay else {}).parts
        lp.sum().backward()
        return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    plain = grads(model, True)
    recomputed = copy.deepcopy(model)
    apply_recompute(recomputed.model.layers, mode, get_spec(cfg).selective_recompute)
    assert any(type(m).__name__.startswith("Recompute") for m in recomputed.modules())
    got = grads(recomputed, True)
    assert plain.keys() == got.keys()
    for k in plain:
        torch.testing.assert_close(got[k], plain[k], rtol=1e-10, atol=1e-12, msg=k)
    unreplayed = grads(model, False)
    assert any(not torch.allclose(unreplayed[k], plain[k]) for k in plain)  # the replay moved the gradients
