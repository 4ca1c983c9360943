"""megaqwen-convert with Qwen2-MoE: HF -> megaqwen -> HF bit-exact, logits equal transformers, and
the aux-free routing bias kept (with a warning) through import and export."""

import json
import logging
from pathlib import Path

import torch
from hf_random import randomise_
from safetensors.torch import load_file, save_file
from transformers import Qwen2MoeConfig
from transformers import Qwen2MoeForCausalLM as HFQwen2Moe

from megaqwen.convert.cli import main as convert_main
from megaqwen.convert.hf import load_pretrained, read_model_weights

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


def save_random_hf(path: Path, dtype=torch.bfloat16) -> HFQwen2Moe:
    hc = Qwen2MoeConfig(vocab_size=131, hidden_size=32, intermediate_size=56, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                        num_experts_per_tok=2, moe_intermediate_size=24,
                        shared_expert_intermediate_size=40, decoder_sparse_step=2, mlp_only_layers=[0],
                        norm_topk_prob=False, tie_word_embeddings=False, rope_theta=1_000_000.0,
                        max_position_embeddings=512, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = HFQwen2Moe(hc)
    model = randomise_(model, mlp_std=0.1, std=0.1).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return model


def test_round_trip_is_bit_exact_and_transformers_reads_it(tmp_path):
    src, native, back = tmp_path / "hf", tmp_path / "native", tmp_path / "back"
    save_random_hf(src)
    assert convert_main(["from-hf", str(src), str(native)]) == 0
    assert convert_main(["to-hf", str(native), str(back), "--no-tokenizer"]) == 0
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b) and any(".mlp.experts.5.down_proj" in k for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k  # bitwise
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (src, back))
    assert cb["architectures"] == ["Qwen2MoeForCausalLM"] and cb["model_type"] == "qwen2_moe"
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                "shared_expert_intermediate_size", "mlp_only_layers", "norm_topk_prob", "hidden_size"):
        assert ca[key] == cb[key], key
    assert "moe_routing_bias_update_rate" not in cb  # stock features only: a stock config
    x = torch.randint(0, 131, (1, 19))
    with torch.no_grad():
        la = HFQwen2Moe.from_pretrained(src, dtype=torch.float32)(x).logits
        lb = HFQwen2Moe.from_pretrained(back, dtype=torch.float32)(x).logits
    assert torch.equal(la, lb)


def test_converted_model_matches_transformers_logits(tmp_path):
    hf = save_random_hf(tmp_path / "hf", dtype=torch.float32).eval()
    convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "native")])
    ours = load_pretrained(tmp_path / "native").eval()
    assert ours.cfg.arch == "qwen2_moe"
    x = torch.randint(0, 131, (2, 23))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= 1e-4


def test_routing_bias_survives_import_export_with_a_warning(tmp_path, caplog):
    src, native, back = tmp_path / "hf", tmp_path / "native", tmp_path / "back"
    save_random_hf(src, dtype=torch.float32)
    # an HF folder carrying a trained bias (as our export writes it): extra tensor + config key
    bias = torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4, 0.25])
    tensors = load_file(src / "model.safetensors")
    tensors[BIAS] = bias
    tensors[BIAS.replace("layers.1", "layers.3")] = -bias
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "moe_routing_bias_update_rate": 0.001}))

    with caplog.at_level(logging.WARNING, logger="megaqwen.convert.hf"):
        assert convert_main(["from-hf", str(src), str(native)]) == 0
    assert "stock transformers Qwen2MoeForCausalLM ignores them" in caplog.text
    cfg, state = read_model_weights(native)  # the native (DCP) checkpoint holds it
    assert cfg.moe_routing_bias_update_rate == 0.001
    assert torch.equal(state[BIAS], bias)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megaqwen.convert.hf"):
        assert convert_main(["to-hf", str(native), str(back), "--no-tokenizer"]) == 0
    assert "2 aux-loss-free routing bias tensor(s)" in caplog.text
    out = load_file(back / "model.safetensors")
    assert torch.equal(out[BIAS], bias)
    assert json.loads((back / "config.json").read_text())["moe_routing_bias_update_rate"] == 0.001
    ours = load_pretrained(back).eval()  # read back on import
    assert torch.equal(ours.get_parameter(BIAS), bias)
    # stock transformers loads the folder but drops the bias: its routing, so its logits, differ
    stock = HFQwen2Moe.from_pretrained(back, dtype=torch.float32).eval()
    x = torch.randint(0, 131, (2, 29))
    with torch.no_grad():
        assert (ours(x) - stock(x).logits).abs().max() > 1e-3
        ours.get_parameter(BIAS).zero_()
        ours.get_parameter(BIAS.replace("layers.1", "layers.3")).zero_()
        assert (ours(x) - stock(x).logits).abs().max() <= 1e-4
