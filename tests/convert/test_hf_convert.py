"""megaqwen-convert: HF -> megaqwen -> HF is bit-exact, logits agree, bad input is named."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2

from megaqwen.convert.cli import main as convert_main
from megaqwen.convert.hf import load_pretrained, to_hf


def save_random_hf(path: Path, tied: bool, dtype=torch.bfloat16) -> HFQwen2:
    hc = Qwen2Config(vocab_size=263, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tied,
                     rope_theta=1_000_000.0, max_position_embeddings=1024, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = HFQwen2(hc)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(path / f))
        return out
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_bit_exact(tmp_path, tied):
    src, native, back = tmp_path / "hf", tmp_path / "native", tmp_path / "back"
    save_random_hf(src, tied)
    assert convert_main(["from-hf", str(src), str(native)]) == 0
    assert convert_main(["to-hf", str(native), str(back), "--no-tokenizer"]) == 0
    a, b = hf_tensors(src), hf_tensors(back)
    if tied:
        a.pop("lm_head.weight", None)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k  # bitwise
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (src, back))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings"):
        assert ca[key] == cb[key], key
    # and transformers loads what we wrote, giving the same logits as the source
    x = torch.randint(0, 263, (1, 19))
    with torch.no_grad():
        la = HFQwen2.from_pretrained(src, dtype=torch.float32)(x).logits
        lb = HFQwen2.from_pretrained(back, dtype=torch.float32)(x).logits
    assert torch.equal(la, lb)


def test_converted_model_matches_transformers_logits(tmp_path):
    src = tmp_path / "hf"
    hf = save_random_hf(src, tied=False, dtype=torch.float32).eval()
    convert_main(["from-hf", str(src), str(tmp_path / "native")])
    ours = load_pretrained(tmp_path / "native").eval()
    x = torch.randint(0, 263, (2, 23))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= 1e-4


def test_sharded_export_and_tokenizer(tmp_path):
    src = tmp_path / "hf"
    save_random_hf(src, tied=True)
    convert_main(["from-hf", str(src), str(tmp_path / "native")])
    out = to_hf(tmp_path / "native", tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for k, v in hf_tensors(src).items():
        if k != "lm_head.weight":
            assert torch.equal(v, hf_tensors(out)[k])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645


def test_export_writes_generation_config_and_uniform_file_modes(tmp_path):
    from transformers import GenerationConfig

    src = tmp_path / "hf"
    save_random_hf(src, tied=True)
    convert_main(["from-hf", str(src), str(tmp_path / "native")])
    out = to_hf(tmp_path / "native", tmp_path / "export", max_shard_bytes=20_000)
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.do_sample) == (151643, 151643, False)
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert any(n.endswith(".safetensors") for n in modes) and "tokenizer.json" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone would write 0600


def test_trained_checkpoint_exports_and_reloads(tmp_path):
    """A trainer-style checkpoint (model + optimizer in DCP) exports only the model tensors."""
    from megaqwen.models import build_model, get_config
    from megaqwen.train.checkpoint import save_checkpoint

    cfg = get_config("debug", vocab_size=97)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 97, (1, 8)), labels=torch.randint(0, 97, (1, 8))).mean().backward()
    opt.step()
    save_checkpoint(tmp_path / "run" / "checkpoints", 7, model, opt,
                    {"consumed_samples": 0, "model_config": cfg.to_dict()})
    out = to_hf(tmp_path / "run", tmp_path / "hf", tokenizer=False)
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v)
    hf = HFQwen2.from_pretrained(out).eval()
    x = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4


def test_bad_inputs_are_named(tmp_path, capsys):
    assert convert_main(["from-hf", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "nope/config.json not found" in capsys.readouterr().err
    src = tmp_path / "hf"
    save_random_hf(src, tied=False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    assert convert_main(["from-hf", str(src), str(tmp_path / "o")]) == 2
    assert "missing ['model.layers.2" in capsys.readouterr().err
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    assert convert_main(["from-hf", str(src), str(tmp_path / "o")]) == 2
    assert "model_type 'llama' is not 'qwen2'" in capsys.readouterr().err
    assert convert_main(["to-hf", str(tmp_path / "empty"), str(tmp_path / "x")]) == 2
    assert "no megaqwen checkpoint" in capsys.readouterr().err


def test_console_script_exists():
    exe = Path(sys.executable).with_name("megaqwen-convert")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "from-hf" in out.stdout
