"""The stage memory check of `megaqwen-stages`, which is the trainer's fit check (`fit_check.fit_report`,
the planner's memory model): activation bytes against autograd's saved tensors within 10%, advice
about cp / recomputation when a long stage does not fit, and a chain stage refused before it starts.
The total against measured CPU peaks is held by tests/plan/test_planner.py (within 10%) and
tests/train/test_fit_check.py (the whole trainer, within 15%)."""


import pytest
import torch

from megaqwen.kernels.registry import resolve_ops
from megaqwen.models import build_model
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.activation import apply_recompute
from megaqwen.plan.memory import GIB, Layout, estimate_memory
from megaqwen.train.fit_check import RunShape, advice, fit_report
from megaqwen.train.stages import main


def _saved_bytes(cfg, mode, b, t):
    """Bytes autograd keeps between forward and backward (each storage once, parameters excluded)."""
    model = build_model(cfg, resolve_ops(device="cpu"), seed=0)
    spec = get_spec(cfg)
    apply_recompute(spec.layers(model), mode, spec.selective_recompute)
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
    est = estimate_memory(cfg, Layout(dp_mode="ddp", recompute=mode, micro_batch=2), 256, 1,
                          act_bytes=4).activations
    assert abs(est / measured - 1) <= 0.10, (mode, est, measured)


def test_advice_when_a_long_stage_does_not_fit():
    """7B at 256K tokens on tp=4 x fsdp dp=16 H100s: activation-bound, so the advice is context
    parallelism or recomputation (each suggestion checked by the same estimate), never more state
    sharding; cp=16 with full recomputation fits."""
    m = get_config("qwen2.5-7b")
    shape = RunShape(m, Layout(tp=4, dp=16, dp_mode="fsdp"), 262_144, 16, 2, cpu=False)
    total = sum(shape.terms().values())
    assert total > 0.9 * 80 * GIB
    (tip,) = advice(shape, 80 * GIB)
    assert tip.startswith("fits with ") and "parallel.cp=" in tip and "dp_mode" not in tip, tip
    for text in tip.removeprefix("fits with ").split(" or with "):
        knob, value = text.split(" ")[0].split("=")
        key = {"parallel.recompute": "recompute", "parallel.cp": "cp"}[knob]
        changed = shape.with_(**{key: value if key == "recompute" else int(value)})
        assert sum(changed.terms().values()) <= 0.9 * 80 * GIB, text
    assert sum(shape.with_(cp=16, recompute="full").terms().values()) <= 0.9 * 80 * GIB
    # cp divides activations, full recomputation keeps one input per layer
    a1, a4 = (estimate_memory(m, Layout(cp=c, dp=4, dp_mode="ddp"), 32_768, 1).activations for c in (1, 4))
    assert a4 == pytest.approx(a1 / 4, rel=1e-3)  # RoPE's fp32 cos/sin are per rank's tokens too
    assert estimate_memory(m, Layout(recompute="full", dp_mode="ddp"), 32_768, 1).activations < a1 / 10


def test_stage_check_reads_the_training_config(make_config, tmp_path):
    cfg = make_config(tmp_path / "run", "sample", "train.seq_len=64", "parallel.recompute=full")
    r = fit_report(cfg, 1)
    assert r.fits and r.available > 0 and r.advice == []
    lay = Layout(dp_mode=cfg.parallel.dp_mode, recompute="full", micro_batch=cfg.train.micro_batch_size)
    assert r.terms["activations"] == estimate_memory(cfg.model, lay, 64, 1, act_bytes=4).activations


def test_a_stage_that_does_not_fit_is_refused_before_it_starts(tmp_path, capsys):
    """The chain's first stage under a 10 MB limit: refused by name with the estimate and its advice,
    before any run folder content is written."""
    out = tmp_path / "run"
    assert main(["debug", "--no-passkey", f"train.out_dir={out}", "train.memory_limit_gb=0.01"]) == 2
    err = capsys.readouterr().err
    assert "stage 's128' does not fit" in err and "GiB per process" in err and "--no-memory-check" in err
    assert not (out / "stages.json").exists()
