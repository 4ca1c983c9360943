"""megaqwen-convert keeps `rope_scaling` (YaRN) and DCA settings both ways; other types are refused."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2

from megaqwen.convert.cli import main as convert_main
from megaqwen.convert.hf import load_pretrained
from megaqwen.models.qwen2.hf_adapter import config_from_hf

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}


def _save(path: Path, max_position_embeddings: int = 1024, **extra) -> HFQwen2:
    hc = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                     max_position_embeddings=max_position_embeddings, **extra)
    torch.manual_seed(0)
    model = HFQwen2(hc)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return model


# 256 = original_max_position_embeddings: Qwen2.5's published YaRN recipe (max_position_embeddings
# 32768, factor 4, original 32768), which transformers 4.45-4.55 read as plain RoPE (the declared floor)
@pytest.mark.parametrize("max_pos", [1024, 256])
def test_round_trip_keeps_yarn_and_dca(tmp_path, max_pos):
    src, native, back = tmp_path / "hf", tmp_path / "native", tmp_path / "back"
    hf = _save(src, max_position_embeddings=max_pos, rope_scaling=YARN)
    cfg = json.loads((src / "config.json").read_text())
    cfg["dual_chunk_attention_config"] = {"chunk_size": 512, "local_size": 64,
                                          "original_max_position_embeddings": 256}
    (src / "config.json").write_text(json.dumps(cfg))
    assert convert_main(["from-hf", str(src), str(native)]) == 0
    ours = load_pretrained(native)
    assert (ours.cfg.rope_scaling, ours.cfg.rope_scaling_factor, ours.cfg.rope_original_max_position,
            ours.cfg.dca_chunk_size, ours.cfg.dca_local_size) == ("yarn", 4.0, 256, 512, 64)
    assert convert_main(["to-hf", str(native), str(back), "--no-tokenizer"]) == 0
    written = json.loads((back / "config.json").read_text())
    rs = written["rope_scaling"]
    assert rs["type"] == rs["rope_type"] == "yarn" and rs["factor"] == 4.0
    assert rs["original_max_position_embeddings"] == 256
    assert written["dual_chunk_attention_config"]["chunk_size"] == 512
    # transformers reads our config.json as yarn, and the converted model's logits equal the source's
    read = AutoConfig.from_pretrained(back)
    assert (getattr(read, "rope_parameters", None) or read.rope_scaling)["rope_type"] == "yarn"
    reloaded = HFQwen2.from_pretrained(back).eval()
    tokens = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf.eval()(tokens).logits
        torch.testing.assert_close(reloaded(tokens).logits, want, rtol=0, atol=1e-5)
        # ours is independent of transformers' reading of the config: it catches a yarn read as plain RoPE
        torch.testing.assert_close(ours.eval()(tokens), want, rtol=0, atol=1e-4)
    assert config_from_hf(written).to_dict() == {**ours.cfg.to_dict(), "name": "hf"}


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_both_spellings_of_the_type_are_read(key):
    for type_key in ("type", "rope_type"):
        hf = Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2).to_dict()
        hf.pop("rope_scaling", None)
        hf[key] = {type_key: "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                   "beta_fast": 16.0}
        cfg = config_from_hf(hf)
        assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_beta_fast) == ("yarn", 2.0, 16.0)


@pytest.mark.parametrize("scaling,match", [
    ({"type": "linear", "factor": 2.0}, "type 'linear' is not supported"),
    ({"rope_type": "dynamic", "factor": 2.0}, "type 'dynamic' is not supported"),
    ({"type": "yarn", "factor": 2.0, "mscale": 0.7, "mscale_all_dim": 1.0},
     r"\['mscale', 'mscale_all_dim'\]"),
    ({"type": "yarn", "factor": 2.0, "truncate": False}, "truncate=false"),
])
def test_unknown_rope_scaling_is_an_error(scaling, match):
    hf = Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2).to_dict()
    hf["rope_scaling"] = scaling
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)
