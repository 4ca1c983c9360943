"""train.fp8 (megaqwen/train/fp8.py): torchao float8 linears on CPU (torch._scaled_mm runs there).

Single process: which linears turn FP8 (and which stay in the master dtype), parameter names and
dtypes unchanged, recipes this machine cannot run refused in one line, and the debug model's loss
curve under tensorwise / rowwise close to the high-precision one through the trainer's own step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao.float8", reason="train.fp8 needs torchao (the fp8 / dev extra)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))  # the layout harness

import trainer_harness as trainer  # noqa: E402

from megaqwen.models.config import get_config  # noqa: E402
from megaqwen.models.spec import get_spec  # noqa: E402
from megaqwen.parallel.config import ParallelConfig  # noqa: E402
from megaqwen.parallel.shards import ShardMap  # noqa: E402
from megaqwen.train.fp8 import Fp8Settings, check_fp8, convert_linears  # noqa: E402

CPU = torch.device("cpu")
CURVE_STEPS, CURVE_RTOL = 10, 0.02
"""Steps of the loss-curve test and the bound on |loss_fp8 / loss_fp32 - 1| at every step
(measured on the debug model over 100 steps by benchmarks/bench_fp8.py: see benchmarks/RESULTS.md)."""


def _converted(cfg, **kw) -> tuple[torch.nn.Module, list[str]]:
    spec = get_spec(cfg)
    model = spec.build(cfg, seed=0)
    s = Fp8Settings(kw.pop("recipe", "tensorwise"), num_layers=cfg.num_layers, **kw)
    return model, convert_linears(model, spec.layers(model), ShardMap(), s)


def test_which_linears_turn_fp8_and_names_and_dtypes_stay():
    cfg = get_config("debug-moe", vocab_size=512)  # 4 layers; layer 0 dense, 1 and 3 sparse
    plain = get_spec(cfg).build(cfg, seed=0)
    model, done = _converted(cfg, skip_modules=("mlp.gate",))
    # first and last layer skipped; router (mlp.gate) and the 64 -> 1 shared-expert gate stay
    assert {f.split(".")[2] for f in done} == {"1", "2"}, done
    assert not any(f.endswith("mlp.gate") or "shared_expert_gate" in f for f in done), done
    assert "model.layers.1.mlp.shared_expert.gate_proj" in done
    assert "model.layers.2.self_attn.q_proj" in done  # qkv with bias
    from torchao.float8.float8_linear import Float8Linear

    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == len(done)
    assert [(n, p.dtype, p.shape) for n, p in model.state_dict().items()] == \
        [(n, p.dtype, p.shape) for n, p in plain.state_dict().items()]
    _, all_layers = _converted(cfg, skip_first_last=False)
    assert {f.split(".")[2] for f in all_layers} == {"0", "1", "2", "3"}


def test_refusals_name_the_reason():
    for recipe, why in (("blockwise", "sm90"), ("mxfp8", "sm100")):
        with pytest.raises(ValueError, match=f"train.fp8={recipe}: .*{why}.*use tensorwise or rowwise"):
            check_fp8(recipe, CPU)
    with pytest.raises(ValueError, match="train.fp8"):
        check_fp8("fp8", CPU)
    with pytest.raises(ValueError, match="train.fp8=rowwise has no Transformer Engine recipe"):
        check_fp8("rowwise", CPU, "te")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="tp_linear_backend=te needs transformer-engine"):
            check_fp8("tensorwise", CPU, "te")
    check_fp8("none", CPU)
    check_fp8("tensorwise", CPU)


def _curve(recipe: str, steps: int) -> list[float]:
    cfg = trainer.layout_config(get_config("debug", vocab_size=512), ParallelConfig(), steps, 4, 2, 32,
                                3e-3, 1234, grad_clip=1.0)
    cfg.train.fp8, cfg.train.fp8_skip_first_last = recipe, False
    run = trainer.build_run(cfg)
    g = torch.Generator().manual_seed(0)
    # a learnable stream: 32 repeated "sentences" of 33 tokens
    table = torch.randint(0, 512, (32, 33), generator=g)
    batches = []
    for _ in range(steps):
        ids = table[torch.randint(0, 32, (4,), generator=g)]
        batches.append({"tokens": ids[:, :-1], "labels": ids[:, 1:],
                        "position_ids": torch.arange(32).expand(4, 32).contiguous(),
                        "document_ids": torch.zeros(4, 32, dtype=torch.long)})
    return [m["loss"] for m in trainer.run_steps(run, batches)]


def test_fp8_loss_curve_follows_high_precision():
    """tensorwise and rowwise on every linear of both debug layers: each step's loss within
    CURVE_RTOL of the fp32 run's, and the curve falls as much."""
    base = _curve("none", CURVE_STEPS)
    for recipe in ("tensorwise", "rowwise"):
        got = _curve(recipe, CURVE_STEPS)
        rel = [abs(a / b - 1) for a, b in zip(got, base)]
        assert max(rel) <= CURVE_RTOL, (recipe, rel)
        assert all(math.isfinite(x) for x in got), (recipe, got)
        assert got[0] - got[-1] >= 0.8 * (base[0] - base[-1]) > 0.3, (recipe, got, base)
