"""megaqwen-convert with Qwen3 and Qwen3-MoE: HF -> megaqwen -> HF bit-exact (same safetensors keys
and bits, same config), transformers reads what we write, converted logits equal transformers'."""

import json
import logging
from pathlib import Path

import pytest
import torch
from hf_random import randomise_
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3MoeConfig
from transformers import Qwen3ForCausalLM as HFQwen3
from transformers import Qwen3MoeForCausalLM as HFQwen3Moe

from megaqwen.convert.cli import main as convert_main
from megaqwen.convert.hf import load_pretrained, read_model_weights

VOCAB = 151


def save_random_hf(path: Path, moe: bool, tied: bool = False, dtype=torch.bfloat16):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, tie_word_embeddings=tied, rope_theta=1_000_000.0,
                  max_position_embeddings=512, rms_norm_eps=1e-6)
    if moe:
        hc = Qwen3MoeConfig(**common, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                            moe_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[1],
                            norm_topk_prob=True)
        cls = HFQwen3Moe
    else:
        hc, cls = Qwen3Config(**common, num_hidden_layers=2), HFQwen3
    torch.manual_seed(0)
    model = cls(hc)
    model = randomise_(model, mlp_std=0.1, std=0.1).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize("moe, tied", [(False, True), (False, False), (True, False)],
                         ids=["qwen3-tied", "qwen3-untied", "qwen3-moe"])
def test_round_trip_is_bit_exact_and_transformers_reads_it(tmp_path, moe, tied):
    src, native, back = tmp_path / "hf", tmp_path / "native", tmp_path / "back"
    save_random_hf(src, moe, tied)
    assert convert_main(["from-hf", str(src), str(native)]) == 0
    cfg, _ = read_model_weights(native)
    assert cfg.arch == ("qwen3_moe" if moe else "qwen3") and cfg.qk_norm and cfg.head_dim == 12
    assert convert_main(["to-hf", str(native), str(back), "--no-tokenizer"]) == 0
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    if tied:
        a.pop("lm_head.weight", None)
    assert set(a) == set(b)
    assert any(k.endswith("self_attn.q_norm.weight") for k in b)
    if moe:
        assert any(".mlp.experts.5.down_proj" in k for k in b) and "model.layers.1.mlp.down_proj.weight" in b
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k  # bitwise
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (src, back))
    assert cb["model_type"] == ca["model_type"]
    assert cb["architectures"] == ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"]
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
            "max_position_embeddings"]
    if moe:
        keys += ["num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                 "norm_topk_prob"]
        # transformers 5 writes num_local_experts; we write the published checkpoints' num_experts
        assert cb["num_experts"] == ca.get("num_experts", ca.get("num_local_experts")) == 6
    for key in keys:
        assert ca[key] == cb[key], key
    cls = HFQwen3Moe if moe else HFQwen3
    x = torch.randint(0, VOCAB, (1, 19))
    with torch.no_grad():
        la = cls.from_pretrained(src, dtype=torch.float32)(x).logits
        lb = cls.from_pretrained(back, dtype=torch.float32)(x).logits
    assert torch.equal(la, lb)


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3", "qwen3-moe"])
def test_converted_model_matches_transformers_logits(tmp_path, moe):
    hf = save_random_hf(tmp_path / "hf", moe, dtype=torch.float32).eval()
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    ours = load_pretrained(tmp_path / "native").eval()
    assert type(ours).__name__ == ("Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM")
    x = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= 1e-4


def test_moe_routing_bias_travels_with_a_qwen3_warning(tmp_path, caplog):
    src, native = tmp_path / "hf", tmp_path / "native"
    save_random_hf(src, moe=True, dtype=torch.float32)
    keys = [f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (0, 2)]  # the sparse layers
    tensors = load_file(src / "model.safetensors")
    for i, key in enumerate(keys):
        tensors[key] = torch.linspace(-0.3, 0.3, 6) * (i + 1)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "moe_routing_bias_update_rate": 0.001}))
    with caplog.at_level(logging.WARNING, logger="megaqwen.convert.hf"):
        assert convert_main(["from-hf", str(src), str(native)]) == 0
    assert "stock transformers Qwen3MoeForCausalLM ignores them" in caplog.text
    _, state = read_model_weights(native)
    assert all(torch.equal(state[key], tensors[key]) for key in keys)
