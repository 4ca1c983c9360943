"""The trainer runs the Qwen3 specs end to end with nothing Qwen3-specific in it: a stock HF folder
written by transformers starts a run (`train.init_from`), the run learns, and its export loads back
into transformers with the logits of our model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megaqwen.train.loop import train


@pytest.mark.parametrize("name", ["debug-qwen3", "debug-qwen3-moe"])
def test_qwen3_trains_from_a_stock_hf_folder_and_exports(tmp_path, shard, make_config, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megaqwen.convert.hf import load_pretrained, to_hf
    from megaqwen.models.config import get_config
    from megaqwen.models.spec import get_spec

    out = tmp_path / "run"
    cfg = make_config(out, shard, f"model={name}", "train.steps=6", "train.lr=3e-3", "train.save_every=6")
    assert cfg.model.arch == get_config(name).arch and cfg.model.qk_norm
    # a stock folder of the run's shape: transformers' own model and save_pretrained
    hf_src = tmp_path / "stock"
    hf_config = get_spec(cfg.model).hf.config_to_hf(cfg.model, torch.float32)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    stock.save_pretrained(hf_src)
    # lr 0: the run holds exactly the stock weights (q/k norms, experts, router by their HF names)
    frozen = tmp_path / "frozen"
    train(make_config(frozen, shard, f"model={name}", "train.steps=3", "train.save_every=3", "train.lr=0",
                      "train.min_lr=0", f"train.init_from={hf_src}"))
    stock_tensors = load_file(hf_src / "model.safetensors")
    exported = load_file(to_hf(frozen, tmp_path / "frozen-hf", tokenizer=False) / "model.safetensors")
    assert any(k.endswith("q_norm.weight") for k in exported)
    assert all(torch.equal(v, stock_tensors[k]) for k, v in exported.items())
    cfg.train.init_from = str(hf_src)
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    back = to_hf(out, tmp_path / "export", tokenizer=False)
    assert json.loads((back / "config.json").read_text())["model_type"] == hf_config["model_type"]
    theirs = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    ours = load_pretrained(back).eval()
    x = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() <= 1e-4
