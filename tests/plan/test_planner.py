"""megaqwen-plan: exact per-rank parameter counts against the fake-process-group meta-device build,
total memory against a measured CPU peak, the search and the command line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch.distributed as dist
from peak_probe import measure_peak

from megaqwen.models.config import get_config, model_names
from megaqwen.parallel.dims import ParallelDims
from megaqwen.plan.cli import main, run
from megaqwen.plan.memory import GPUS, Layout, estimate_memory, rank_param_count, routed_experts
from megaqwen.plan.search import evaluate, search


def _meta_count(cfg, world, rank, tp=1, pp=1, fsdp=False, schedule="1f1b", microbatches=8, ep=1):
    """Parameter elements rank `rank` holds when the trainer's steps build the layout on meta."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megaqwen.models.spec import get_spec
    from megaqwen.parallel.data_parallel import apply_fsdp
    from megaqwen.parallel.dims import ParallelDims
    from megaqwen.parallel.pipeline import plan_pipeline, prune_to_rank
    from megaqwen.parallel.shards import local_param_bytes

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        mesh = ParallelDims(world_size=world, tp=tp, pp=pp, ep=ep).build_mesh("cpu")
        spec = get_spec(cfg)
        model = spec.build(cfg, device="meta")
        if pp > 1:
            prune_to_rank(model, plan_pipeline(cfg.num_layers, pp, schedule, 0, None, microbatches),
                          mesh.rank("pp"), spec.pipeline)
        spec.parallelize_tp(model, mesh)
        if ep > 1:  # the trainer's order: experts split, then FSDP over edp for them, dp for the rest
            from megaqwen.parallel.expert_parallel import apply_expert_parallel, apply_fsdp_experts, ep_groups

            groups = ep_groups(mesh, ep)
            apply_expert_parallel(model, groups)
            if fsdp:
                apply_fsdp_experts(model, mesh, groups)
        if fsdp:
            apply_fsdp(model, mesh, spec.layers(model))
        assert all(p.device.type == "meta" for p in model.parameters())
        coords = (mesh.rank("pp") if pp > 1 else 0, mesh.dp_rank)
        return local_param_bytes(model) // 4, coords
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_param_counts_equal_the_meta_build():
    """Exact, not approximate: 72B tp=8 x FSDP dp=8 (the meta-assembly test's layout), an uneven FSDP
    split (0.5B: 448 q rows over dp=3), a tied model split over pp, an MoE at tp=2 x ep=2 x FSDP
    dp=4 (experts over the edp pairs), and the planner's top 72B layout
    on 512 GPUs (its first and last pipeline ranks) built on the simulated world."""
    m72 = get_config("qwen2.5-72b")
    for rank in (0, 63):
        got, (_, d) = _meta_count(m72, 64, rank, tp=8, fsdp=True)
        assert got == rank_param_count(m72, Layout(tp=8, dp=8, dp_mode="fsdp"), dp_rank=d)
    m05 = get_config("qwen2.5-0.5b")
    for rank in (0, 5):
        got, (_, d) = _meta_count(m05, 6, rank, tp=2, fsdp=True)
        assert got == rank_param_count(m05, Layout(tp=2, dp=3, dp_mode="fsdp"), dp_rank=d), rank
    for sched in ("1f1b", "interleaved_1f1b", "zbv"):
        lay = Layout(tp=2, pp=2, dp=1, pp_schedule=sched, dp_mode="ddp")
        for rank in (0, 3):
            got, (p, _) = _meta_count(m05, 4, rank, tp=2, pp=2, schedule=sched)
            assert got == rank_param_count(m05, lay, pp_rank=p), (sched, rank)
    moe = get_config("qwen1.5-moe-a2.7b")
    for rank in (0, 7):
        got, (_, d) = _meta_count(moe, 8, rank, tp=2, fsdp=True, ep=2)
        assert got == rank_param_count(moe, Layout(tp=2, dp=4, ep=2, dp_mode="fsdp"), dp_rank=d), rank
    best = search(m72, 512, GPUS["h100"], 4096, 1024)[0].layout
    for rank in (0, 511):
        got, (p, _) = _meta_count(m72, 512, rank, tp=best.tp, pp=best.pp, schedule=best.pp_schedule,
                                  microbatches=1024 // best.dp)
        assert got == rank_param_count(m72, best, pp_rank=p, fsdp=False), (best, rank)


@pytest.mark.parametrize("name", model_names())
def test_one_rank_holds_every_parameter_of_every_shipped_model(name):
    """The spec's shapes against the config's closed form (`ModelConfig.num_params`), every YAML in
    conf/model, on one rank (sharded layouts: against the meta build, the slow tests in this file)."""
    m = get_config(name)
    assert rank_param_count(m, Layout(dp_mode="ddp")) == m.num_params()


ARCH_CASES = [  # (model, world, layout): every architecture, tp 1/2/4/8, pp 1/2, ep on the MoE models
    ("qwen2.5-7b", 8, Layout(tp=2, pp=2, dp=2, dp_mode="fsdp")),
    ("qwen2.5-7b", 4, Layout(tp=4, dp=1, dp_mode="ddp")),
    ("qwen2.5-1.5b", 4, Layout(tp=4, dp=1, dp_mode="ddp")),  # tp > KV heads (2): KV heads replicated
    ("qwen3-8b", 8, Layout(tp=2, pp=2, dp=2, dp_mode="fsdp")),
    ("qwen3-8b", 8, Layout(tp=4, dp=2, dp_mode="fsdp")),
    ("qwen2-57b-a14b", 8, Layout(tp=2, dp=4, ep=2, dp_mode="fsdp")),
    ("qwen2-57b-a14b", 8, Layout(tp=1, pp=2, dp=4, ep=4, dp_mode="fsdp")),
    ("qwen3-30b-a3b", 8, Layout(tp=4, dp=2, ep=2, dp_mode="fsdp")),
    ("qwen3-30b-a3b", 8, Layout(tp=2, pp=2, dp=2, dp_mode="ddp")),
    ("qwen3-30b-a3b", 16, Layout(tp=8, dp=2, ep=2, dp_mode="fsdp")),  # tp > KV heads (4)
]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name, world, lay", ARCH_CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_param_counts_equal_the_meta_build_for_every_architecture(name, world, lay):
    """The spec's shapes (`ModelSpec.param_shapes`) make the count exact for Qwen3's q/k norms and
    Qwen3-MoE's shared-expert-free blocks as for Qwen2: first and last rank of each layout."""
    m = get_config(name)
    if m.num_experts > 8:  # thousands of expert modules take ~20 s even on meta; every layer is alike
        m = get_config(name, num_layers=4)
    for rank in (0, world - 1):
        got, (p, d) = _meta_count(m, world, rank, tp=lay.tp, pp=lay.pp, fsdp=lay.dp_mode == "fsdp",
                                  ep=lay.ep)
        assert got == rank_param_count(m, lay, pp_rank=p, dp_rank=d), (name, lay, rank)


CPU_CASES = [  # (model overrides, micro-batch, seq): one state-heavy, one activation-heavy
    (dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=8, num_heads=8,
          num_kv_heads=2), 1, 512),
    (dict(vocab_size=1024, num_layers=3), 1, 4096),
]
TOLERANCE = 0.10


@pytest.mark.slow
@pytest.mark.parametrize("kw, b, t", CPU_CASES)
def test_total_memory_within_tolerance_of_measured_cpu_peak(kw, b, t):
    """fp32 on CPU, one process, two AdamW steps: the peak resident set above the process's own
    baseline (interpreter, torch and its allocator arenas measured before the model exists) against
    the planner's total for the trivial layout with 4-byte activations."""
    peak = measure_peak(kw, b, t, warm_up=True)
    est = estimate_memory(get_config("debug", **kw), Layout(dp_mode="ddp", micro_batch=b), t, 1,
                          act_bytes=4).total
    assert abs(est / peak - 1) <= TOLERANCE, (kw, est, peak, est / peak)


def test_state_bytes_by_dp_mode_and_inflight_by_schedule():
    m = get_config("qwen2.5-7b")
    n = m.num_params()
    ddp = estimate_memory(m, Layout(dp=8, dp_mode="ddp"), 1024, 8)
    assert ddp.params == n and ddp.state == 16 * n
    assert estimate_memory(m, Layout(dp=8, dp_mode="zero1"), 1024, 8).state == 8 * n + 8 * n / 8
    assert estimate_memory(m, Layout(dp=8, dp_mode="zero3"), 1024, 8).state == 16 * n / 8
    assert estimate_memory(m, Layout(dp=8, dp_mode="zero2"), 1024, 8).state == 2 * n + 14 * n / 8
    m = get_config("qwen2.5-14b")  # 48 layers: 4 x 2 chunks
    acts = {s: estimate_memory(m, Layout(pp=4, pp_schedule=s, dp_mode="ddp"), 1024, 16, pp_rank=0)
            for s in ("gpipe", "1f1b", "interleaved_1f1b", "zbv")}
    assert acts["gpipe"].in_flight == 16 and acts["1f1b"].in_flight == 4 and acts["zbv"].in_flight == 4
    assert acts["interleaved_1f1b"].in_flight == pytest.approx(4 * (1 + 3 / 8))
    last = estimate_memory(m, Layout(pp=4, dp_mode="ddp"), 1024, 16, pp_rank=3)
    assert last.in_flight == 1 and last.activations < acts["1f1b"].activations
    with pytest.raises(ValueError, match=r"num_layers=48 is not divisible by pp\*virtual"):
        estimate_memory(m, Layout(pp=5), 1024, 8)
    with pytest.raises(ValueError, match="dp_mode='zero4'"):
        estimate_memory(m, Layout(dp_mode="zero4"), 1024, 8)


def test_search_ranks_fitting_layouts_for_72b_and_moe():
    m = get_config("qwen2.5-72b")
    plans = search(m, 512, GPUS["h100"], 4096, 1024)
    assert plans and all(p.memory.fits and p.layout.world == 512 for p in plans)
    times = [p.step.step_s for p in plans]
    assert times == sorted(times) and 0.3 < plans[0].step.mfu < 0.65
    assert not search(m, 8, GPUS["a100-40g"], 4096, 64)  # 72B cannot train on one 40 GB node
    moe = search(get_config("qwen2-57b-a14b"), 64, GPUS["h200"], 4096, 256)
    assert moe and any(p.layout.ep > 1 for p in moe[:20])
    # a fixed layout: the bubble of 1F1B is (p-1)/(m+p-1)
    p = evaluate(m, Layout(tp=8, pp=8, dp=8, dp_mode="zero1", recompute="full"), GPUS["h100"], 4096, 1024)
    assert p.step.bubble == pytest.approx(7 / (128 + 7))


def test_cli_table_and_errors(capsys):
    out = run(["model=qwen1.5-moe-a2.7b", "gpus=64", "seq=4096", "global_batch=512", "gpu=h200", "top=3"])
    assert "layouts fit" in out and len(out.splitlines()) == 2 + 2 + 3
    out = run(["model=qwen2.5-72b", "gpus=64", "tp=8", "pp=8", "dp_mode=zero1", "recompute=full"])
    assert "pipeline rank " in out and "fits" in out
    assert main(["gpu=v100"]) == 2 and "gpu='v100'" in capsys.readouterr().err
    assert main(["tp=8", "gpus=63"]) == 2
    assert main(["bogus"]) == 2


@pytest.mark.parametrize("argv, says", [
    (["gpsu=64"], "megaqwen-plan: error: gpsu=64: unknown key 'gpsu' (did you mean gpus?)"),
    (["global_bacth=64"], "(did you mean global_batch?)"),
    (["gpu=h10"], "gpu='h10' is not one of h100 | h200 | a100 | a100-40g (did you mean h100?)"),
    (["tp=8", "pp_schedule=1fb1"], "(did you mean 1f1b?)"),
    (["tp=8", "dp_mode=zer1"], "(did you mean zero1?)"),
    (["tp=eight"], "tp='eight' must be an integer"),
])
def test_cli_mistakes_are_one_line_with_the_closest_spelling(capsys, argv, says):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megaqwen-plan: error: ") and says in err
    assert "megaqwen-plan: megaqwen-plan" not in err


def test_no_layout_says_whether_memory_or_divisibility_is_why():
    out = run(["model=qwen2.5-72b", "gpus=60", "global_batch=1024"])
    assert "memory is not why" in out and "does not split into micro-batches over dp = 15, 30, 60" in out
    assert "multiple of 15" in out
    out = run(["model=qwen2.5-72b", "gpus=8", "gpu=a100-40g", "global_batch=64"])
    assert "no layout fits in memory" in out and "memory is not why" not in out


def test_search_proposes_only_layouts_the_trainer_accepts():
    """48 experts do not split over ep=32 or 64, which the search tries: the trainer's validation
    (the model spec's rule) refuses those, so the search, asking it, drops them and counts why;
    every layout it proposes passes the trainer's validation."""
    from megaqwen.parallel.setup import accumulation_steps, validate_layout
    from megaqwen.plan.search import Rejected

    moe = get_config("qwen2-57b-a14b", num_experts=48)
    rejected = Rejected()
    plans = search(moe, 64, GPUS["h200"], 4096, 256, rejected=rejected)
    assert plans and {p.layout.ep for p in plans} <= {1, 2, 4, 8, 16}
    assert any("not divisible by ep=32" in why for why in rejected.refused)
    for p in plans[:20]:
        pcfg = p.layout.parallel_config()
        validate_layout(pcfg, ParallelDims.from_config(pcfg, 64), moe, 4096, "native",
                        accumulation_steps(256, p.layout.micro_batch, p.layout.dp))


@pytest.mark.parametrize("lay, says", [
    (Layout(pp=2, dp=2, dp_mode="zero3"), "with train.engine=deepspeed is not supported"),
    (Layout(dp=1, dp_mode="zero2"), "train.engine=deepspeed needs a distributed launch"),
    (Layout(ep=2, dp=2), "ep=2 needs an MoE model"),
    (Layout(pp=7, pp_schedule="zbv", dp_mode="ddp"), "needs at least 14 micro-batches"),
])
def test_layout_refusals_are_the_trainers_own(lay, says):
    """`Layout.validate` asks `parallel.setup.validate_layout` (DeepSpeed modes as engine=deepspeed):
    the planner, the fit check and the trainer refuse with one message."""
    from megaqwen.parallel.setup import validate_layout

    m = get_config("qwen2.5-7b")
    with pytest.raises(ValueError, match=re.escape(says)) as planner:
        lay.validate(m, 1024, 4)
    pcfg = lay.parallel_config()
    with pytest.raises(ValueError) as trainer:
        validate_layout(pcfg, ParallelDims.from_config(pcfg, lay.world), m, 1024, lay.engine, 4)
    assert str(trainer.value) in str(planner.value)


def test_the_planner_names_no_model_module_or_moe_field():
    """Generic planner: model facts come from the spec (`param_shapes`, its expert flags), not names."""
    hits = []
    for path in (Path(__file__).parents[2] / "megaqwen" / "plan").glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"is_moe|num_experts|embed_tokens|lm_head|q_proj|model\.model\.", code):
                hits.append(f"{path.name}:{n}: {line.strip()}")
    assert not hits, hits


def test_routed_experts_come_from_the_spec():
    for name, (e, k) in {"qwen2-57b-a14b": (64, 8), "qwen3-30b-a3b": (128, 8),
                         "qwen1.5-moe-a2.7b": (60, 4)}.items():
        r = routed_experts(get_config(name))
        assert (r.experts, r.active) == (e, k), name
    assert routed_experts(get_config("qwen2.5-7b")) is None
