"""MFU arithmetic and the peak-FLOP/s lookup."""

from __future__ import annotations

import pytest
import torch

from megaqwen.models.config import get_config
from megaqwen.parallel.metrics import PEAK_BF16_FLOPS, device_peak_flops, mfu, peak_memory_per_rank


def test_mfu_of_qwen_0_5b_by_hand():
    cfg = get_config("qwen2.5-0.5b")
    fpt = cfg.flops_per_token(4096)
    # 6 N (N counts the LM head, not the embedding lookup) + 6 L s d_q attention
    n = cfg.num_params(include_embedding=False) + cfg.vocab_size * cfg.hidden_size
    assert fpt == 6 * n + 6 * 24 * 4096 * 896
    # 8 H100s at 100k tokens/s each
    util = mfu(fpt, 8 * 100_000, 989e12, 8)
    assert util == pytest.approx(fpt * 100_000 / 989e12)
    assert 0.03 < util < 0.6


def test_peak_lookup_override_and_cpu():
    cpu = torch.device("cpu")
    assert device_peak_flops(cpu) is None and mfu(1e9, 1e3, None, 1) is None
    assert device_peak_flops(cpu, override=2e12) == 2e12
    names = [k for k, _ in PEAK_BF16_FLOPS]
    # specific names must be matched before their prefixes (first match wins)
    assert names.index("H100 PCIe") < names.index("H100") and names.index("A100") < names.index("A10")
    assert names.index("L40S") < names.index("L4") and names.index("A10G") < names.index("A10")


def test_peak_memory_single_process():
    m = peak_memory_per_rank(torch.device("cpu"))
    assert m["peak_mem_gib_max"] == m["peak_mem_gib_min"] == m["peak_mem_gib/rank0"] > 0
