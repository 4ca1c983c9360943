"""The stage memory check against measured CPU runs: activation bytes (saved-tensor hooks) within 10%,
peak resident memory of two AdamW steps within 25% (the tolerance the module documents)."""


import pytest
import torch
from peak_probe import measure_peak

from megaqwen.kernels.registry import resolve_ops
from megaqwen.models import build_model
from megaqwen.models.config import get_config
from megaqwen.models.qwen2.model import Attention
from megaqwen.parallel.activation import apply_recompute
from megaqwen.train.memory_check import GIB, check_stage_memory, estimate


def _saved_bytes(cfg, mode, b, t):
    """Bytes autograd keeps between forward and backward (each storage once, parameters excluded)."""
    model = build_model(cfg, resolve_ops(device="cpu"), seed=0)
    apply_recompute(model.model.layers, mode, (Attention, "core"))
    tokens = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=torch.Generator().manual_seed(0))
    seen = {}

    def pack(x):
        if not (x.requires_grad and x.is_leaf):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(tokens[:, :-1], labels=tokens[:, 1:])
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_activation_estimate_matches_saved_tensors(mode):
    cfg = get_config("debug", vocab_size=1024, num_layers=3)
    measured = _saved_bytes(cfg, mode, 2, 256)
    est = estimate(cfg, 256, 2, recompute=mode).activations
    assert abs(est / measured - 1) <= 0.10, (mode, est, measured)


@pytest.mark.slow
def test_total_estimate_within_25_percent_of_measured_peak(mode="none"):
    """A fresh process (freed memory stays resident, so a second run in one process would measure
    nothing): 4,096 tokens, 3 layers, two AdamW steps. Measured by hand at 4K-16K tokens, none /
    selective / full: ratios 0.87-1.16; at 2K fixed overheads dominate (0.72), hence >= 4K here."""
    peak = measure_peak(dict(vocab_size=1024, num_layers=3), 1, 4096, recompute=mode)
    est = estimate(get_config("debug", vocab_size=1024, num_layers=3), 4096, 1, recompute=mode).total
    assert abs(est / peak - 1) <= 0.25, (mode, est, peak)


def test_advice_when_a_stage_does_not_fit():
    cfg = get_config("qwen2.5-7b")
    r = estimate(cfg, 262_144, 1, tp=8, dp=8, dp_mode="fsdp", sequence_parallel=True, act_bytes=2,
                 device_bytes=80 * GIB, device="H100 80GB")
    assert not r.fits and "DOES NOT FIT" in r.summary()
    assert any("parallel.cp=" in a for a in r.advice), r.advice
    fixed = estimate(cfg, 262_144, 1, tp=8, cp=16, dp=8, dp_mode="fsdp", sequence_parallel=True,
                     recompute="full", act_bytes=2, device_bytes=80 * GIB)
    assert fixed.fits and fixed.advice == []
    # cp divides activations, recompute keeps one input per layer
    a1, a4 = (estimate(cfg, 32_768, 1, cp=c).activations for c in (1, 4))
    assert a4 == pytest.approx(a1 / 4)
    assert estimate(cfg, 32_768, 1, recompute="full").activations < a1 / 10


def test_check_stage_memory_reads_the_training_config(make_config, tmp_path):
    cfg = make_config(tmp_path / "run", "sample", "train.seq_len=64", "parallel.recompute=full")
    r = check_stage_memory(cfg)
    assert r.fits and r.device_bytes > 0
    assert r.activations == estimate(cfg.model, 64, cfg.train.micro_batch_size, recompute="full").activations
