"""MoE metrics: relative load, drops and router losses from a step's load; the heat-map PNG."""

import json

import torch

from megaqwen.models.config import get_config
from megaqwen.models.qwen2_moe import build_model
from megaqwen.parallel.expert_parallel import LayerLoad, collect_load
from megaqwen.train.moe_metrics import add_loads, load_heatmap, moe_metrics


def _loads():
    return {"model.layers.1.mlp": LayerLoad(torch.tensor([6.0, 2, 0, 0]), 0.0),
            "model.layers.3.mlp": LayerLoad(torch.tensor([2.0, 2, 2, 2]), 4.0)}


def test_metrics_values():
    m = moe_metrics(_loads(), aux_loss=1.25, z_loss=0.5)
    assert m["moe/L1/load_max"] == 3.0 and m["moe/L1/load_min"] == 0.0  # 6 of 8: 3x a fair share
    assert m["moe/L3/load_max"] == m["moe/L3/load_min"] == 1.0
    assert m["moe/L1/e1"] == 1.0 and m["moe/L3/e3"] == 1.0
    assert m["moe/L3/dropped_frac"] == 0.5 and m["moe/dropped"] == 4.0 and m["moe/dropped_frac"] == 0.25
    assert m["moe/load_max"] == 3.0 and m["moe/load_max_mean"] == 2.0
    assert m["aux_loss"] == 1.25 and m["z_loss"] == 0.5
    json.dumps(m)  # JSONL-ready: plain floats
    assert all(isinstance(v, float) for v in m.values())
    assert not any("/e" in k for k in moe_metrics(_loads(), per_expert_limit=4))
    assert moe_metrics({}) == {}


def test_from_a_model_forward_and_heatmap(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_config("debug-moe", hidden_size=32, vocab_size=64, moe_capacity_factor=1.0))
    tokens = torch.randint(0, 64, (2, 24))
    for _ in range(2):  # two micro-batches: counts add up
        parts = model(tokens, tokens)
    loads = collect_load(model)
    assert set(loads) == {"model.layers.1.mlp", "model.layers.3.mlp"}
    assert all(ld.load_E.sum() == 2 * 48 * 2 for ld in loads.values())  # micro x tokens x top-k
    assert collect_load(model) == {}  # counters reset
    m = moe_metrics(loads, parts.aux.item(), parts.z.item())
    assert m["moe/load_max"] >= 1.0 and 0 <= m["moe/dropped_frac"] < 1
    total = add_loads(add_loads(None, loads), loads)
    assert torch.equal(total["model.layers.1.mlp"].load_E, 2 * loads["model.layers.1.mlp"].load_E)
    png = load_heatmap(total, tmp_path / "expert_load.png", title="steps 1-2")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
