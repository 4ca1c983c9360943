"""The load-balancing forms of `megaqwen.models.moe_balance` on one process: each against a hand
computation, the global form's split into micro-batch shares (with the step's counts) summing to the
whole batch's value and gradient, the forms telling a skewed batch apart, and a skewed router
balancing under the global-batch loss."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megaqwen.models.config import get_config
from megaqwen.models.moe_balance import ALL_LAYERS, BalanceStats, RoutingCounts, balance_loss
from megaqwen.models.qwen2_moe.model import build_model, load_balancing_loss


def _cfg(mode: str, **kw):
    return replace(get_config("debug-qwen3-moe", vocab_size=256), moe_balance=mode, **kw)


def _records(model, tokens):
    records: list = []
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    model.hidden_states(tokens, pos, records=records)
    return records


def _hand(records, e: int, mode: str) -> torch.Tensor:
    """Plain loops: E * sum_e f_e P_e per layer (global), per layer and row (sequence)."""
    vals = []
    for r in records:
        probs = r.probs_NE.reshape(r.rows, -1, e)
        top = r.topk_NK.reshape(r.rows, -1, r.topk_NK.shape[-1])
        groups = [(probs.reshape(-1, e), top.reshape(-1, top.shape[-1]))] if mode == "global_batch" \
            else [(probs[b], top[b]) for b in range(r.rows)]
        per = []
        for p, t in groups:
            f = torch.stack([(t == i).sum() for i in range(e)]).float() / p.shape[0]
            per.append(e * (f * p.mean(0)).sum())
        vals.append(torch.stack(per).mean())
    return torch.stack(vals).mean()


@pytest.mark.parametrize("mode", ["global_batch", "sequence"])
def test_forms_equal_a_hand_computation(mode):
    cfg = _cfg(mode)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    records = _records(model, tokens)
    sparse = sum(cfg.is_sparse_layer(i) for i in range(cfg.num_layers))
    got = balance_loss(records, mode, cfg.num_experts, sparse)
    torch.testing.assert_close(got, _hand(records, cfg.num_experts, mode), rtol=1e-6, atol=1e-7)
    # micro_batch is HF's pooled form (tests/model/test_qwen3.py checks it against transformers)
    torch.testing.assert_close(balance_loss(records, "micro_batch", cfg.num_experts, sparse),
                               load_balancing_loss(records, cfg.num_experts))


def _split_sum(model, cfg, tokens, mode: str, pieces: int):
    """Sum of the micro-batch shares (rows cut in `pieces`) with the whole batch's counts from a
    counting pass, as the trainer's pre-pass gives them; replicas 1 (no averaging here)."""
    sparse = sum(cfg.is_sparse_layer(i) for i in range(cfg.num_layers))
    chunks = tokens.chunk(pieces)
    counts = RoutingCounts(cfg.num_experts, mode)
    with torch.no_grad():
        for c in chunks:
            counts.observe(_records(model, c))
    if mode == "global_batch":
        stats = BalanceStats(mode, {lay: [torch.stack(v).sum((0, 1))] for lay, v in counts.by_layer.items()},
                             [float(tokens.numel())], replicas=1.0)
    else:  # micro_batch: one micro-batch, its layers pooled
        pooled = sum(torch.stack(v).sum((0, 1)) for v in counts.by_layer.values())
        stats = BalanceStats(mode, {ALL_LAYERS: [pooled]}, [float(tokens.numel())], replicas=1.0)
    total = 0
    for c in chunks:
        # each chunk as a "stage" holding every layer: partial shares add up
        total = total + balance_loss(_records(model, c), mode, cfg.num_experts, sparse, True, stats)
        if mode == "micro_batch":
            stats.cursor.clear()  # the same one micro-batch, seen in pieces
    return total


@pytest.mark.parametrize("mode", ["global_batch", "micro_batch"])
def test_shares_with_the_step_counts_sum_to_the_whole_batch_value_and_gradient(mode):
    cfg = _cfg(mode)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(2))
    sparse = sum(cfg.is_sparse_layer(i) for i in range(cfg.num_layers))
    whole = balance_loss(_records(model, tokens), mode, cfg.num_experts, sparse)
    g_whole = torch.autograd.grad(whole, list(model.parameters()), allow_unused=True)
    split = _split_sum(model, cfg, tokens, mode, 4)
    g_split = torch.autograd.grad(split, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_split, g_whole):
        if b is not None:  # relative to the gradient's largest entry, as the layout tests
            assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() <= 1e-5


def test_global_and_micro_batch_forms_differ_on_a_skewed_batch():
    """Each row routes to its own pair of experts: every micro-batch (one row) is as unbalanced as it
    can be, the global batch is perfectly balanced. The micro-batch mean says K * E / K = E (=8), the
    global form says K (=2): only the global form leaves such a specialisation unpunished."""
    cfg = _cfg("global_batch", num_layers=2, mlp_only_layers=[], decoder_sparse_step=1)
    model = build_model(cfg, seed=0)
    e, k, rows = cfg.num_experts, cfg.num_experts_per_tok, 4
    with torch.no_grad():  # the router reads the token embedding's first E/k dims: row b -> experts 2b, 2b+1
        for layer in model.model.layers.values():
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            gate = layer.mlp.gate.weight
            gate.zero_()
            for ex in range(e):
                gate[ex, ex // k] = 200.0
        emb = model.model.embed_tokens.weight
        emb.zero_()
        for b in range(rows):
            emb[b, b] = 1.0
        for name, p in model.named_parameters():  # attention and experts silent: routing sees embeddings
            if any(s in name for s in ("o_proj", "down_proj")):
                p.zero_()
    tokens = torch.arange(rows)[:, None].expand(rows, 6)
    records = _records(model, tokens)
    sparse = cfg.num_layers
    glob = balance_loss(records, "global_batch", e, sparse)
    micro = torch.stack([balance_loss(_records(model, tokens[b:b + 1]), "micro_batch", e, sparse)
                         for b in range(rows)]).mean()
    seq = balance_loss(records, "sequence", e, sparse)
    assert glob.item() == pytest.approx(k, rel=1e-4)
    assert micro.item() == pytest.approx(e, rel=1e-4) and seq.item() == pytest.approx(e, rel=1e-4)


def _load_ratio(model, tokens) -> float:
    records = _records(model, tokens)
    ratios = []
    for r in records:
        load = torch.bincount(r.topk_NK.reshape(-1), minlength=model.cfg.num_experts).float()
        ratios.append((load.max() / load.mean()).item())
    return max(ratios)


def test_a_skewed_router_balances_over_steps_under_the_global_loss():
    """Routers pushed towards experts 0 and 1 (max/mean load ~4, the most top-2 of 8 allows): 40 steps
    of the global-batch aux loss (plus the LM loss) bring the worst layer's max/mean load down by 40%
    (measured: 3.97 -> 1.63)."""
    torch.manual_seed(0)
    cfg = _cfg("global_batch", router_aux_loss_coef=1.0)
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # a shared direction in every token's state, which experts 0, 1 read
        model.model.embed_tokens.weight.add_(0.01)
        for block in model.moe_blocks().values():
            block.gate.weight[:2] += 0.06
    data = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = _load_ratio(model, data)
    for _ in range(40):
        parts = model(data, data.roll(-1, 1))
        (parts.mean() + cfg.router_aux_loss_coef * parts.aux).backward()
        opt.step()
        opt.zero_grad()
    after = _load_ratio(model, data)
    assert before >= 3.5 and after <= 0.6 * before, (before, after)
