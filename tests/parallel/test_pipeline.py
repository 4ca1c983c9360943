"""Pipeline parallelism (torch.distributed.pipelining on gloo) against one process.

Every layout is a run of the trainer: its Config, its builders (meta -> pipeline cut -> TP/SP ->
FSDP2 -> local pieces -> Pipeline -> optimizer) and its `train_step` for STEPS steps over the same
global batches as the single-process reference (tests/parallel/trainer_harness.py). It reports:
relative loss differences, the worst relative gradient error at the first optimizer step (pieces
gathered to full tensors), whether the tied embedding's copies on the first and last stage are
bit-identical at the end, and the step's grad norm.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megaqwen.models.config import get_config
from megaqwen.parallel.pipeline import SCHEDULES, plan_pipeline
from megaqwen.train.config import TrainConfig

from .parallel_harness import LR, SEED, STEPS, gather_full, spawn
from .trainer_harness import build_run, capture_grads, layout_config, reference_adamw, run_steps

LAYERS, T = 8, 16


def _cfg(tied: bool = True, moe: bool = False):
    if moe:  # 4 layers, sparse 1 and 3; pipelines take the z-loss, not the HF aux loss (refused)
        return replace(get_config("debug-moe"), vocab_size=1024, router_aux_loss_coef=0.0,
                       router_z_loss_coef=0.01)
    return replace(get_config("debug"), vocab_size=1024, num_layers=LAYERS, tie_word_embeddings=tied)


def _batches(cfg, global_b: int, t: int = T) -> list[dict[str, torch.Tensor]]:
    """STEPS global batches (global_b, t), fixed by seed; some labels ignored, so micro-batches
    weigh by their valid-token counts."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (STEPS, global_b, t + 1), generator=g)
    labels = ids[..., 1:].clone()
    labels[:, 0, :3] = -100
    tokens = ids[..., :-1]
    return [{"tokens": tokens[s], "labels": labels[s], "document_ids": torch.zeros_like(tokens[s]),
             "position_ids": torch.arange(t).expand_as(tokens[s]).contiguous()} for s in range(STEPS)]


def _reference(cfg, global_b: int):
    """One process, plain PyTorch: the whole global batch per step, the run's AdamW settings."""
    from megaqwen.models.spec import get_spec
    from megaqwen.parallel.grad_norm import grad_norm

    model = get_spec(cfg).build(cfg, seed=SEED)
    opt = reference_adamw(model, TrainConfig(lr=LR))
    losses, grads, norm = [], {}, 0.0
    for s, b in enumerate(_batches(cfg, global_b)):
        parts = model(b["tokens"], b["labels"])
        z = getattr(parts, "z", None)
        (parts.sum / parts.count + (cfg.router_z_loss_coef * z if z is not None else 0)).backward()
        if s == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            norm = grad_norm(model.named_parameters(), None).item()
        opt.step()
        opt.zero_grad()
        losses.append((parts.sum / parts.count).item())
    return {"losses": losses, "grads": grads, "grad_norm": norm}


def _run_layout(rank, world, cfg, lay: dict, ref: dict, global_b: int, mbs: int) -> dict:
    """The layout through the trainer's builders and `train_step` (tests/parallel/trainer_harness)."""
    import torch.distributed as dist

    from megaqwen.parallel.config import ParallelConfig

    pcfg = ParallelConfig(tp=lay.get("tp", 1), pp=lay["pp"], sequence_parallel=lay.get("sp", False),
                          ep=lay.get("ep", 1),
                          cp=lay.get("cp", 1), cp_mode=lay.get("cp_mode", "ring"), cp_tile=4,
                          dp_mode=lay.get("mode", "ddp"), pp_schedule=lay["schedule"],
                          pp_virtual_stages=lay.get("v", 0), pp_layers=lay.get("layers"),
                          recompute=lay.get("recompute", "none"), compile=lay.get("compile", False))
    run = build_run(layout_config(cfg, pcfg, STEPS, global_b, mbs, T, LR, SEED))
    seen = capture_grads(run, gather_full)
    metrics = run_steps(run, _batches(cfg, global_b))
    grad_err = 0.0
    for n, g in seen["grads"].items():
        r = ref["grads"][n]
        grad_err = max(grad_err, ((g - r).abs().max() / r.abs().max().clamp(min=1e-12)).item())
    norm_rel = abs(metrics[0]["grad_norm"] / ref["grad_norm"] - 1)
    losses = [m["loss"] for m in metrics]
    tied_equal = True
    if run.pipe.embed_group is not None:
        w = gather_full(run.plain.model.embed_tokens.weight.detach(), "model.embed_tokens.weight", run.shards)
        other = w.clone()
        dist.broadcast(other, group=run.pipe.embed_group, group_src=0)
        tied_equal = torch.equal(w, other)
    flag = torch.tensor([float(tied_equal), grad_err], dtype=torch.float64)
    worst = flag.clone()
    dist.all_reduce(worst[1:], op=dist.ReduceOp.MAX)
    dist.all_reduce(worst[:1], op=dist.ReduceOp.MIN)
    loss_rel = max(abs(a / b - 1) for a, b in zip(losses, ref["losses"]))
    return {"loss_rel": loss_rel, "grad_err": worst[1].item(), "tied_equal": bool(worst[0].item()),
            "norm_rel": norm_rel, "losses": losses}


def _worker(rank, world, cases, global_b, mbs):
    out = {}
    refs = {}
    for name, lay in cases:
        cfg = _cfg(lay.get("tied", True), lay.get("moe", False))
        key = (cfg.tie_word_embeddings, cfg.is_moe)
        if key not in refs:
            refs[key] = _reference(cfg, global_b)
        out[name] = _run_layout(rank, world, cfg, lay, refs[key], global_b, mbs)
    return out


def _check(results):
    bad = {n: r for n, r in results.items()
           if not (r["loss_rel"] <= 1e-5 and r["grad_err"] <= 1e-5 and r["tied_equal"]
                   and r["norm_rel"] <= 1e-5)}
    assert not bad, bad


@pytest.mark.distributed
@pytest.mark.slow
def test_pp2_every_schedule_equals_one_process():
    """pp=2, 4 micro-batches of 1: every schedule, with and without virtual stages, tied and untied."""
    cases = [(f"{s}-v{v}", {"pp": 2, "schedule": s, "v": v})
             for s, v in [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4),
                          ("zero_bubble", 2), ("zbv", 2), ("dualpipev", 2)]]
    cases.append(("1f1b-untied", {"pp": 2, "schedule": "1f1b", "tied": False}))
    cases.append(("1f1b-uneven", {"pp": 2, "schedule": "1f1b", "layers": [3, 5]}))
    cases.append(("1f1b-recompute", {"pp": 2, "schedule": "1f1b", "recompute": "full"}))
    _check(spawn(_worker, 2, cases, 4, 1))


@pytest.mark.distributed
@pytest.mark.slow
def test_pp_composed_with_tp_and_fsdp_and_pp4():
    """World 4: pp=2 x tp=2 (+SP), pp=2 x dp=2 FSDP2 and ZeRO-1, pp=2 x cp=2 (ring, all-to-all),
    pp=4 under every schedule family."""
    cases = [("pp2-tp2-sp-1f1b", {"pp": 2, "tp": 2, "sp": True, "schedule": "1f1b"}),
             ("pp2-tp2-interleaved", {"pp": 2, "tp": 2, "schedule": "interleaved_1f1b"}),
             ("pp2-dp2-fsdp-1f1b", {"pp": 2, "mode": "fsdp", "schedule": "1f1b"}),
             ("pp2-cp2-ring-1f1b", {"pp": 2, "cp": 2, "schedule": "1f1b"}),
             ("moe-pp2-dp2-ep2-1f1b", {"pp": 2, "ep": 2, "moe": True, "schedule": "1f1b"}),
             ("moe-pp2-dp2-ep2-fsdp-interleaved", {"pp": 2, "ep": 2, "moe": True, "mode": "fsdp",
                                                   "schedule": "interleaved_1f1b", "layers": [1, 1, 1, 1]}),
             ("pp2-cp2-alltoall-interleaved", {"pp": 2, "cp": 2, "cp_mode": "alltoall",
                                               "schedule": "interleaved_1f1b"}),
             ("pp2-dp2-zero1-zbv", {"pp": 2, "mode": "zero1", "schedule": "zbv"}),
             ("pp4-1f1b", {"pp": 4, "schedule": "1f1b"}),
             ("pp4-interleaved-v2", {"pp": 4, "schedule": "interleaved_1f1b"}),
             ("pp4-zero_bubble", {"pp": 4, "schedule": "zero_bubble"}),
             ("pp4-dualpipev", {"pp": 4, "schedule": "dualpipev"}),
             ("pp4-zbv-tp1", {"pp": 4, "schedule": "zbv"}),
             ("pp4-gpipe-uneven", {"pp": 4, "schedule": "gpipe", "layers": [1, 3, 3, 1]})]
    _check(spawn(_worker, 4, cases, 8, 1))


def test_plan_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"num_layers=24 is not divisible by pp\*virtual stages = 5\*1"):
        plan_pipeline(24, 5, "1f1b", 0, None, 8)
    with pytest.raises(ValueError, match="needs at least 4 micro-batches per step, got 2"):
        plan_pipeline(8, 4, "1f1b", 0, None, 2)
    with pytest.raises(ValueError, match="needs at least 8 micro-batches"):
        plan_pipeline(8, 4, "dualpipev", 0, None, 4)
    with pytest.raises(ValueError, match="sums to 7"):
        plan_pipeline(8, 2, "1f1b", 0, [3, 4], 4)
    with pytest.raises(ValueError, match="exactly 2 stages per rank"):
        plan_pipeline(8, 2, "zbv", 4, None, 8)
    with pytest.raises(ValueError, match="choose from"):
        plan_pipeline(8, 2, "pipedream", 0, None, 8)
    with pytest.raises(ValueError, match="not a multiple of the 2 rounds"):
        plan_pipeline(8, 2, "interleaved_1f1b", 0, None, 5)
    plan = plan_pipeline(8, 2, "zbv", 0, [0, 3, 5, 0], 4)
    assert [plan.stage_rank(s) for s in range(4)] == [0, 1, 1, 0]
    assert plan.stages_of(0) == [0, 3] and list(plan.layer_ids(2)) == [3, 4, 5, 6, 7]
    looped = plan_pipeline(8, 2, "interleaved_1f1b", 0, None, 4)
    assert looped.stages_of(1) == [1, 3] and looped.first_rank == 0 and looped.last_rank == 1
    assert set(SCHEDULES) == {"gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "dualpipev"}


def test_engine_and_moe_refused_with_pipeline():
    from megaqwen.parallel.config import ParallelConfig
    from megaqwen.parallel.setup import check_pipeline

    pcfg = ParallelConfig(pp=2)
    with pytest.raises(ValueError, match="train.engine=deepspeed is not supported"):
        check_pipeline(pcfg, _cfg(), "deepspeed", 4)
    # HF's aux loss under pp: each stage's exact share from the step's counts (test_moe_balance_layouts)
    assert check_pipeline(pcfg, get_config("debug-moe"), "native", 4).layers == (2, 2)
    assert check_pipeline(pcfg, _cfg(moe=True), "native", 4).layers == (2, 2)
    assert check_pipeline(ParallelConfig(pp=1), _cfg(), "deepspeed", 1) is None
    assert check_pipeline(pcfg, _cfg(), "native", 4).layers == (4, 4)


def test_bubble_fraction_formulas():
    p, m = 4, 8
    assert plan_pipeline(8, p, "1f1b", 0, None, m).bubble_fraction() == pytest.approx(3 / 11)
    assert plan_pipeline(8, p, "interleaved_1f1b", 0, None, m).bubble_fraction() == pytest.approx(3 / 19)
    assert plan_pipeline(8, p, "zero_bubble", 0, None, m).bubble_fraction() == pytest.approx(3 / 51)
    assert plan_pipeline(8, p, "zbv", 0, None, m).bubble_fraction() == 0.0
    assert plan_pipeline(8, p, "dualpipev", 0, None, m).bubble_fraction() == pytest.approx(3 / 27)
