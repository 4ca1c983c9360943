"""Qwen3 and Qwen3-MoE against transformers on the same random weights; published configs and counts.

Parameter counts are checked three ways: our meta-built model against transformers' own
Qwen3ForCausalLM / Qwen3MoeForCausalLM built on meta from the same official values (exact), against
the closed form `ModelConfig.num_params` (exact), and against the model cards' totals.
"""

import pytest
import torch
from hf_random import assert_logits_match, randomise_
from transformers import Qwen3Config, Qwen3MoeConfig
from transformers import Qwen3ForCausalLM as HFQwen3
from transformers import Qwen3MoeForCausalLM as HFQwen3Moe

from megaqwen.models import ModelConfig, get_config, model_names
from megaqwen.models.qwen2_moe import SparseMoeBlock
from megaqwen.models.spec import get_spec

# name: (total, non-embedding, active) in billions as the Qwen3 model cards print them
MODEL_CARDS = {
    "qwen3-0.6b": ("0.6", "0.44", None),
    "qwen3-1.7b": ("1.7", "1.4", None),
    "qwen3-4b": ("4.0", "3.6", None),
    "qwen3-8b": ("8.2", "6.95", None),
    "qwen3-14b": ("14.8", "13.2", None),
    "qwen3-32b": ("32.8", "31.2", None),
    "qwen3-30b-a3b": ("30.5", "29.9", "3.3"),
    "qwen3-235b-a22b": ("235", "234", "22"),
}
QWEN3_SIZES = list(MODEL_CARDS)
DEBUG_MOE = get_config("debug-qwen3-moe").to_dict()
# Exact totals of the official safetensors (unique tensors: Qwen3-0.6B's file also stores the tied
# lm_head, 751,632,384 with it).
OFFICIAL_PARAMS = {"qwen3-0.6b": 596_049_920, "qwen3-8b": 8_190_735_360, "qwen3-30b-a3b": 30_532_122_624}


# ------------------------------------------------------------------------------ configs and counts


def hf_config(cfg: ModelConfig):
    """transformers' config from the same official values (not through our adapter)."""
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_word_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings)
    if cfg.arch == "qwen3":
        return Qwen3Config(**common)
    return Qwen3MoeConfig(**common, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                          moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                          decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=cfg.mlp_only_layers)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied head counted once


def _meta_models(cfg: ModelConfig):
    ours = get_spec(cfg).build(cfg, device="meta")
    with torch.device("meta"):
        theirs = (HFQwen3 if cfg.arch == "qwen3" else HFQwen3Moe)(hf_config(cfg))
    return ours, theirs


@pytest.mark.parametrize("name", [*QWEN3_SIZES, "debug-qwen3", "debug-qwen3-moe"])
def test_parameter_count_equals_transformers_and_closed_form(name):
    cfg = get_config(name)
    # our 12,032 expert modules of 235B-A22B take ~30 s to build even on meta: whole models for the
    # dense sizes, 2 of the (identical) layers for the MoE ones; transformers' whole model always
    ours, theirs = _meta_models(get_config(name, num_layers=2) if cfg.num_experts > 8 else cfg)
    assert _count(ours) == _count(theirs) == ours.cfg.num_params()
    assert {n: p.shape for n, p in ours.named_parameters() if ".experts." not in n} == \
        {n: p.shape for n, p in theirs.named_parameters() if ".experts." not in n}
    experts = sum(p.numel() for n, p in ours.named_parameters() if ".experts." in n)
    assert experts == sum(p.numel() for n, p in theirs.named_parameters() if ".experts." in n)
    if ours.cfg.num_layers != cfg.num_layers:
        # transformers' whole 235B-A22B takes ~80 s even on meta: every layer is the same MoE layer
        # (no dense layers), so its count is one layer's times the depth plus the rest, both taken
        # from transformers' own 1- and 2-layer builds
        assert cfg.decoder_sparse_step == 1 and not cfg.mlp_only_layers
        with torch.device("meta"):
            one = _count(HFQwen3Moe(hf_config(get_config(name, num_layers=1))))
        two = _count(theirs)  # transformers' 2-layer build, above
        assert two - one > 0
        assert one + (cfg.num_layers - 1) * (two - one) == cfg.num_params()
    else:
        assert _count(theirs) == cfg.num_params()
    if name in OFFICIAL_PARAMS:
        assert cfg.num_params() == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", QWEN3_SIZES)
def test_model_card_totals(name):
    cfg = get_config(name)
    total, non_emb, active = MODEL_CARDS[name]

    def near(n: int, printed: str) -> bool:  # within one unit of the printed last digit
        unit = 10.0 ** -len(printed.partition(".")[2])
        return abs(n / 1e9 - float(printed)) < unit

    assert near(cfg.num_params(), total), cfg.num_params()
    assert near(cfg.num_params(include_embedding=False), non_emb), cfg.num_params(include_embedding=False)
    if active is not None:
        assert near(cfg.active_params(), active), cfg.active_params()
    else:
        assert cfg.active_params() == cfg.num_params()


def test_every_published_size_and_its_official_values():
    qwen3 = {n for n in model_names() if get_config(n).arch in ("qwen3", "qwen3_moe")}
    qwen3 -= {"debug-qwen3", "debug-qwen3-moe"}
    assert qwen3 == set(MODEL_CARDS)
    for name in QWEN3_SIZES:
        cfg = get_config(name)
        assert (cfg.qk_norm, cfg.qkv_bias, cfg.head_dim, cfg.vocab_size) == (True, False, 128, 151_936)
        assert cfg.tie_word_embeddings == (name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"))
    moe = get_config("qwen3-30b-a3b")
    assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob, moe.shared_expert_intermediate_size,
            moe.arch) == (128, 8, True, 0, "qwen3_moe")


@pytest.mark.parametrize("name", [*QWEN3_SIZES, "debug-qwen3", "debug-qwen3-moe"])
def test_hf_config_round_trip(name):
    """config.json we write reads back to the same config (what train.init_from compares)."""
    cfg = get_config(name)
    adapter = get_spec(cfg).hf
    d = adapter.config_to_hf(cfg, torch.bfloat16)
    assert d["head_dim"] == 128 if name in QWEN3_SIZES else d["head_dim"] == 24
    assert d["attention_bias"] is False and d["architectures"] == adapter.HF_ARCHITECTURES
    if cfg.num_experts:
        assert d["num_experts"] == cfg.num_experts and "num_local_experts" not in d  # the published key
    assert adapter.config_from_hf(d, name=cfg.name) == cfg


def test_kv_free_forward_through_the_spec_on_meta():
    """Published widths through spec.build and the split forward on meta (2 layers): hidden states,
    logits and loss shapes. The MoE dispatch counts tokens per expert (bincount: data-dependent, no
    meta kernel), so the MoE size runs its layers with mlp_only_layers plus its router on meta."""
    for name, kw in (("qwen3-0.6b", {}), ("qwen3-8b", {}), ("qwen3-30b-a3b", {"mlp_only_layers": [0, 1]})):
        cfg = get_config(name, num_layers=2, **kw)
        model = get_spec(cfg).build(cfg, device="meta")
        tokens = torch.zeros(2, 7, dtype=torch.long, device="meta")
        pos, attn = model.prepare_inputs(tokens, None, None)
        h = model.hidden_states(tokens, pos, attn)
        assert h.shape == (2, 7, cfg.hidden_size)
        assert model.logits(h).shape == (2, 7, cfg.vocab_size)
        assert model.loss(h, tokens).sum.shape == ()
        attn_mod = model.model.layers["0"].self_attn
        assert attn_mod.q_proj.weight.shape == (cfg.num_heads * 128, cfg.hidden_size)
        assert attn_mod.q_norm.weight.shape == attn_mod.k_norm.weight.shape == (128,)
        assert attn_mod.q_proj.bias is None
    cfg = get_config("qwen3-30b-a3b", num_layers=1)
    block = get_spec(cfg).build(cfg, device="meta").model.layers["0"].mlp
    routing, w = block.route(torch.zeros(14, cfg.hidden_size, device="meta"))
    assert routing.probs_NE.shape == (14, 128) and w.shape == routing.topk_NK.shape == (14, 8)


@pytest.mark.parametrize("kw, match", [
    (dict(arch="qwen3", qk_norm=False, qkv_bias=False), r"arch 'qwen3' has QK-norm and no QKV bias"),
    (dict(arch="qwen3", qk_norm=True, qkv_bias=True), r"got qk_norm=True, qkv_bias=True"),
    (dict(qk_norm=True), r"qk_norm=true needs arch \['qwen3', 'qwen3_moe'\]"),
    (dict(arch="qwen3", qk_norm=True, qkv_bias=False, num_experts=4, num_experts_per_tok=2,
          moe_intermediate_size=8), "needs arch 'qwen3_moe'"),
    (dict(DEBUG_MOE, shared_expert_intermediate_size=32), "has no shared expert"),
    (dict(DEBUG_MOE, num_experts=0), "arch 'qwen3_moe' needs num_experts > 0"),
])
def test_bad_qwen3_config_names_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_hf_config_with_attention_bias_is_refused():
    from megaqwen.models.qwen3.hf_adapter import config_from_hf

    d = get_spec("qwen3").hf.config_to_hf(get_config("debug-qwen3"), torch.float32)
    with pytest.raises(ValueError, match="attention_bias=true is not supported"):
        config_from_hf({**d, "attention_bias": True})
    with pytest.raises(ValueError, match="model_type 'qwen2' is not 'qwen3'"):
        config_from_hf({**d, "model_type": "qwen2"})


# ------------------------------------------------------------------------------ logits vs transformers

DENSE = {
    # name: (hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied)
    "gqa_tied_wide_heads": (48, 100, 2, 4, 2, 20, 211, True),  # q 80 wide on a 48 residual
    "mha_untied": (40, 72, 3, 4, 4, 10, 157, False),  # head_dim == hidden / heads
    "mqa_odd": (56, 90, 2, 6, 1, 14, 199, False),
}
MOE = {
    # name: (hidden, layers, heads, kv, head_dim, experts, top_k, moe_i, dense_i, sparse_step,
    #        mlp_only, norm_topk, vocab, tied)
    "all_sparse_norm": (48, 2, 4, 2, 16, 6, 2, 40, 100, 1, [], True, 199, False),
    "mixed_raw_tied": (40, 4, 4, 4, 12, 5, 3, 24, 90, 2, [0], False, 131, True),
}


def hf_dense(case: str) -> HFQwen3:
    h, i, n, heads, kv, hd, vocab, tied = DENSE[case]
    hc = Qwen3Config(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                     num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, tie_word_embeddings=tied,
                     rope_theta=1_000_000.0, max_position_embeddings=512, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = HFQwen3(hc)
    randomise_(model)
    return model


def hf_moe(case: str) -> HFQwen3Moe:
    h, n, heads, kv, hd, e, k, mi, di, step, only, norm, vocab, tied = MOE[case]
    hc = Qwen3MoeConfig(vocab_size=vocab, hidden_size=h, intermediate_size=di, num_hidden_layers=n,
                        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, num_experts=e,
                        num_experts_per_tok=k, moe_intermediate_size=mi, decoder_sparse_step=step,
                        mlp_only_layers=only, norm_topk_prob=norm, tie_word_embeddings=tied,
                        rope_theta=1_000_000.0, max_position_embeddings=512, rms_norm_eps=1e-6,
                        router_aux_loss_coef=0.01, output_router_logits=True)
    torch.manual_seed(0)
    model = HFQwen3Moe(hc)
    randomise_(model)
    return model


def ours_from(hf: torch.nn.Module):
    """Our model (through the spec of the model_type) holding the HF model's weights."""
    from megaqwen.convert.hf import MODEL_TYPES

    spec = get_spec(MODEL_TYPES[hf.config.model_type])
    cfg = spec.hf.config_from_hf(hf.config.to_dict())
    model = spec.build(cfg)
    sd = hf.state_dict()
    if hasattr(spec.hf, "from_fused_state_dict"):
        sd = spec.hf.from_fused_state_dict(sd)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=True)
    return cfg, model


@pytest.mark.parametrize("case", [*DENSE, *MOE])
def test_logits_match_transformers(case):
    hf = (hf_dense(case) if case in DENSE else hf_moe(case)).eval()
    cfg, ours = ours_from(hf)
    ours.eval()
    assert type(ours).__name__ == ("Qwen3ForCausalLM" if case in DENSE else "Qwen3MoeForCausalLM")
    if case in MOE:
        sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers.values()]
        assert sparse == [cfg.is_sparse_layer(i) for i in range(cfg.num_layers)] and any(sparse)
        assert all(b.shared_expert is None for b in ours.moe_blocks().values())
    assert_logits_match(hf, ours, cfg.vocab_size)


def test_qk_norm_matters():
    """The check above can fail: q_norm's weight changes the logits (it is used, before RoPE)."""
    hf = hf_dense("gqa_tied_wide_heads").eval()
    _, ours = ours_from(hf)
    tokens = torch.randint(0, 211, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = ours(tokens)
        ours.model.layers["1"].self_attn.q_norm.weight.mul_(1.5)
        assert (ours(tokens) - before).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["mha_untied", "all_sparse_norm", "mixed_raw_tied"])
def test_loss_aux_and_grads_match_transformers(case):
    """LM (+ coef * aux) loss and every gradient, routers included, on a sequence both sides route
    whole (HF shifts labels inside; ours get them shifted with the last position ignored)."""
    from megaqwen.models.qwen2_moe.hf_adapter import from_fused_state_dict

    hf = (hf_dense(case) if case in DENSE else hf_moe(case)).train()
    cfg, ours = ours_from(hf)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = -100
    out = hf(tokens, labels=tokens)
    out.loss.backward()
    parts = ours(tokens, labels=labels)
    total = parts.mean()
    if cfg.num_experts:
        torch.testing.assert_close(parts.aux, out.aux_loss, atol=1e-6, rtol=1e-5)
        total = total + cfg.router_aux_loss_coef * parts.aux
    assert abs(total.item() - out.loss.item()) <= 1e-5
    total.backward()
    hf_grads = from_fused_state_dict({n: p.grad for n, p in hf.named_parameters() if p.grad is not None})
    assert any(n.endswith("q_norm.weight") for n in hf_grads)
    for name, p in ours.named_parameters():
        if name not in hf_grads:  # an expert no token chose: no grad on either side
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, hf_grads[name], atol=1e-5, rtol=1e-4, msg=name)
