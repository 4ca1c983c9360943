"""train.fp8 (megaqwen/train/fp8.py): torchao float8 linears on CPU (torch._scaled_mm runs there).

Single process: which linears turn FP8 (and which stay in the master dtype), parameter names and
dtypes unchanged, recipes this machine cannot run refused in one line, and the debug model's loss
curve under tensorwise / rowwise close to the high-precision one through the trainer's own step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
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
    with pytest.raises(ValueError, match="train.fp8=rowwise with parallel.tp=2 is not supported"):
        check_fp8("rowwise", CPU, tp=2)
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
        assert got[0] - got[-1] >= 0.5 * (base[0] - base[-1]) > 0, (recipe, got, base)


def _hf_tensors(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: (st.get_tensor(k).dtype, tuple(st.get_tensor(k).shape)) for k in st.keys()})  # noqa: SIM118
    return out


@pytest.mark.slow
def test_resume_with_fp8_toggled_and_hf_export_unchanged(tmp_path):
    """Checkpoints keep the master dtype: a run saved under FP8 resumes without it and the other way
    round; a step-2 checkpoint written under FP8 and one written without hold the same names, dtypes
    and shapes, and so do their HF exports."""
    import json

    from megaqwen.convert.cli import main as convert_main
    from megaqwen.data.indexed import IndexedDatasetBuilder
    from megaqwen.models.weights import read_weights
    from megaqwen.train.checkpoint import step_dir
    from tests.parallel.test_launch import losses, single_process

    shard, rng = str(tmp_path / "docs"), np.random.default_rng(0)
    with IndexedDatasetBuilder(shard) as b:  # test_launch's documents: 512-token vocabulary
        for _ in range(100):
            b.add_document(rng.integers(4, 512, int(rng.integers(20, 200))).astype(np.int64))
    on_off, off_on = tmp_path / "on_off", tmp_path / "off_on"
    single_process(on_off, shard, "train.fp8=tensorwise", "train.fp8_skip_first_last=false",
                   "train.exit_at_step=2")
    single_process(on_off, shard, "train.fp8=none")  # resumes at step 3 in fp32
    single_process(off_on, shard, "train.exit_at_step=2")
    single_process(off_on, shard, "train.fp8=rowwise", "train.fp8_skip_first_last=false")
    for run in (on_off, off_on):
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4], (run.name, steps)
    # same data and weights, FP8 in one of each pair of steps: within the FP8 curve tolerance
    assert max(abs(a / b - 1) for a, b in zip(losses(on_off), losses(off_on))) <= CURVE_RTOL
    exports = {}
    for run in (on_off, off_on):
        ckpt = step_dir(run / "checkpoints", 2)  # on_off's written under FP8, off_on's without
        weights = read_weights(ckpt)[1]
        exports[run.name] = {k: (v.dtype, tuple(v.shape)) for k, v in weights.items()}
        assert convert_main(["to-hf", str(ckpt), str(tmp_path / f"hf_{run.name}"), "--no-tokenizer"]) == 0
    assert exports["on_off"] == exports["off_on"] and {d for d, _ in exports["on_off"].values()} == {
        torch.float32}
    hf_on, hf_off = tmp_path / "hf_on_off", tmp_path / "hf_off_on"
    assert _hf_tensors(hf_on) == _hf_tensors(hf_off)
    assert json.loads((hf_on / "config.json").read_text()) == json.loads((hf_off / "config.json").read_text())
