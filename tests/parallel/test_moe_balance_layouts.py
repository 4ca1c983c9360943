"""Load-balancing losses under every split of a step == one process over the whole global batch
(fp32, gloo on CPU, rel <= 1e-5): the logged aux loss, the LM losses and every gradient.

debug-qwen3-moe (global-batch balancing, its default) with a large aux coefficient (0.1, so the
aux gradient is a real part of every router's gradient), through the trainer's builders and
`train_step` (tests/parallel/trainer_harness.py): pp2 x dp2 with 4 micro-batches per dp rank (the
counting pre-pass runs through the pipeline), pp2 x dp2 x ep2, cp2 x dp2 (MoE x cp, the counts summed
over the sequence shards), and HF's micro-batch form under pp2 x dp2 (each micro-batch's counts pooled
over both stages), and the sequence form under cp2 x dp2 (each row's counts over its shards). The
one-process references compute the forms directly: the global and sequence forms on
the whole batch in one forward, HF's form as the mean over the micro-batches (one row each) of HF's loss.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.train.config import TrainConfig

from .parallel_harness import LR, SEED, gather_full, spawn
from .test_pipeline import T, _batches
from .trainer_harness import build_run, capture_grads, layout_config, reference_adamw, run_steps

pytestmark = pytest.mark.distributed
STEPS, GLOBAL_B, MBS = 2, 8, 1


def _cfg(mode: str):
    return replace(get_config("debug-qwen3-moe", vocab_size=1024), moe_balance=mode,
                   router_aux_loss_coef=0.1, router_z_loss_coef=0.0)


def _reference(cfg) -> dict:
    model = get_spec(cfg).build(cfg, seed=SEED)
    opt = reference_adamw(model, TrainConfig(lr=LR))
    out = {"losses": [], "aux": []}
    for s, b in enumerate(_batches(cfg, GLOBAL_B)[:STEPS]):
        parts = model(b["tokens"], b["labels"])
        if cfg.moe_balance != "micro_batch":  # the whole batch in one forward: global form; the
            aux = parts.aux  # sequence form's mean over rows (of equal length) is the whole batch's
        else:  # HF's form per micro-batch of MBS rows, averaged
            aux = torch.stack([model(b["tokens"][i:i + MBS], b["labels"][i:i + MBS]).aux
                               for i in range(0, GLOBAL_B, MBS)]).mean()
        (parts.mean() + cfg.router_aux_loss_coef * aux).backward()
        if s == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        out["losses"].append(parts.mean().item())
        out["aux"].append(aux.item())
    return out


def _run(rank: int, world: int, cfg, lay: dict, ref: dict) -> dict:
    import torch.distributed as dist

    from megaqwen.parallel.config import ParallelConfig

    pcfg = ParallelConfig(pp=lay.get("pp", 1), ep=lay.get("ep", 1), cp=lay.get("cp", 1), cp_tile=4,
                          pp_schedule="1f1b")
    run = build_run(layout_config(cfg, pcfg, STEPS, GLOBAL_B, MBS, T, LR, SEED))
    seen = capture_grads(run, gather_full)
    metrics = run_steps(run, _batches(cfg, GLOBAL_B)[:STEPS])
    err = torch.tensor([max(((g - ref["grads"][n]).abs().max() / ref["grads"][n].abs().max()).item()
                            for n, g in seen["grads"].items())], dtype=torch.float64)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    rel = lambda a, b: max(abs(x / y - 1) for x, y in zip(a, b))  # noqa: E731
    return {"loss_rel": rel([m["loss"] for m in metrics], ref["losses"]),
            "aux_rel": rel([m["aux_loss"] for m in metrics], ref["aux"]), "grad_err": err.item(),
            "aux": [m["aux_loss"] for m in metrics], "ref_aux": ref["aux"],
            "layers_logged": sorted(k for k in metrics[0] if k.endswith("/load_max") and "/L" in k)}


def _worker(rank: int, world: int, cases: list[tuple]) -> dict:
    refs: dict = {}
    out = {}
    for name, mode, lay in cases:
        cfg = _cfg(mode)
        if mode not in refs:
            refs[mode] = _reference(cfg)
        out[name] = _run(rank, world, cfg, lay, refs[mode])
    return out


@pytest.mark.slow
def test_balancing_under_pp_dp_ep_cp_equals_one_process_over_the_global_batch():
    cases = [("pp2-dp2-global", "global_batch", {"pp": 2}),
             ("pp2-dp2-ep2-global", "global_batch", {"pp": 2, "ep": 2}),
             ("cp2-dp2-global", "global_batch", {"cp": 2}),
             ("pp2-dp2-micro", "micro_batch", {"pp": 2}),
             ("cp2-dp2-sequence", "sequence", {"cp": 2})]
    out = spawn(_worker, 4, cases)
    bad = {n: r for n, r in out.items()
           if not (r["loss_rel"] <= 1e-5 and r["aux_rel"] <= 1e-5 and r["grad_err"] <= 1e-5)}
    assert not bad, bad
    # the forms differ on the same data (the test can tell them apart)
    assert abs(out["pp2-dp2-global"]["aux"][0] / out["pp2-dp2-micro"]["aux"][0] - 1) > 1e-3
    # under pp the expert-load metrics cover both stages' sparse layers (1 on stage 0, 3 on stage 1)
    assert out["pp2-dp2-global"]["layers_logged"] == ["moe/L1/load_max", "moe/L3/load_max"]
