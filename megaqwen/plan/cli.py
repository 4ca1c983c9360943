"""`megaqwen-plan`: which layouts fit, and how fast, for a model on N GPUs.

  megaqwen-plan model=qwen2.5-72b gpus=512 seq=4096 global_batch=1024 gpu=h100 [top=15]
  megaqwen-plan model=qwen2.5-72b gpus=512 seq=4096 global_batch=1024 gpu=h100 tp=8 pp=4 \
      pp_schedule=interleaved_1f1b dp_mode=zero1 recompute=selective micro_batch=1   # one layout
  megaqwen-plan scaling ...          # hyper-parameter scaling laws (`megaqwen.scaling`)

Keys: model, gpus, seq, global_batch (sequences), gpu (h100 | h200 | a100 | a100-40g), efficiency
(fraction of peak the largest GEMMs reach, default 0.72, fitted to Megatron-LM's Table 1;
smaller GEMMs get less by their roofline), top; a layout is evaluated alone when any of tp,
pp, cp, ep, etp, dp, dp_mode, recompute, pp_schedule, pp_virtual_stages, micro_batch is given (dp
defaults to gpus / (tp pp cp); dp_mode zero2/zero3 mean the DeepSpeed engine; etp as
parallel.etp: -1 = tp, k | tp, 0 = experts whole per tp rank). For an MoE model the table adds,
per rank and step, the routed experts' GEMM TFLOPs (forward + backward), the GiB it sends in the
expert all-to-alls and in the expert-TP all-reduces. Exit status 1 when no layout fits (or the one
given does not), 2 for a mistake in the arguments. The search lists only layouts
the trainer accepts (it asks the trainer's own validation, `parallel.setup.validate_layout`); when
none fits it says whether memory or divisibility (batch, heads, layers over the degrees) is why.
"""

from __future__ import annotations

import sys

from megaqwen.models.config import get_config
from megaqwen.parallel.activation import RECOMPUTE_MODES
from megaqwen.parallel.data_parallel import DP_MODES
from megaqwen.parallel.pipeline import SCHEDULES
from megaqwen.plan.memory import GIB, GPUS, Layout, routed_experts
from megaqwen.plan.perf import DEFAULT_EFFICIENCY, ERROR_BAND
from megaqwen.plan.search import Plan, Rejected, evaluate, search, tied
from megaqwen.suggest import check_choice, did_you_mean

PROG = "megaqwen-plan"
LAYOUT_INT = ("tp", "pp", "cp", "ep", "etp", "dp", "pp_virtual_stages", "micro_batch")
LAYOUT_STR = ("dp_mode", "recompute", "pp_schedule")
RUN_KEYS = ("model", "gpus", "seq", "global_batch", "gpu", "efficiency", "top")
KEYS = (*RUN_KEYS, *LAYOUT_INT, *LAYOUT_STR)
CHOICES = {"gpu": tuple(GPUS), "dp_mode": (*DP_MODES, "zero2", "zero3"), "recompute": RECOMPUTE_MODES,
           "pp_schedule": tuple(SCHEDULES)}
"""Fixed-choice keys: the trainer's own lists (dp_mode zero2 / zero3: the DeepSpeed engine)."""


def parse(argv: list[str]) -> dict[str, str]:
    """key=value arguments; ValueError naming the first one that is not, with the closest key."""
    out = {}
    for a in argv:
        k, eq, v = a.partition("=")
        if not eq:
            raise ValueError(f"cannot read {a!r}: give key=value{did_you_mean(a, KEYS)}; "
                             f"keys: {', '.join(KEYS)}")
        if k not in KEYS:
            raise ValueError(f"{a}: unknown key {k!r}{did_you_mean(k, KEYS)}; keys: {', '.join(KEYS)}")
        out[k] = v
    for k, choices in CHOICES.items():
        if k in out:
            check_choice(k, out[k], choices)
    return out


def _number(a: dict[str, str], key: str, default: float, kind: type = int):
    try:
        return kind(a.get(key, default))
    except ValueError:
        raise ValueError(f"{key}={a[key]!r} must be {'an integer' if kind is int else 'a number'}") from None


def _model(name: str):
    try:
        return get_config(name)
    except ValueError as e:
        raise ValueError(f"model={name}: {e}") from None


def table(plans: list[Plan], moe: bool = False) -> str:
    """One row per plan; `moe` adds etp and, per rank and step, expert TFLOPs, all-to-all GiB and
    expert-TP all-reduce GiB."""
    head = (f"{'#':>3} {'tp':>2} {'pp':>2} {'sched':<9} {'cp':>2} {'ep':>2} {'dp':>4} {'dp_mode':<7} "
            f"{'recomp':<9} {'mb':>2} | {'state':>6} {'act':>6} {'total GiB':>9} | {'bubble':>6} "
            f"{'step s':>7} {'MFU':>6} {'Mtok/s':>7}")
    if moe:
        head += f" | {'etp':>3} {'exp TF':>7} {'a2a GiB':>7} {'etp GiB':>7}"
    rows = [head, "-" * len(head)]  # act = activations + transients + gathered parameters + buckets
    ranks = tied(plans)
    for p, rank in zip(plans, ranks):
        lay, mem, st = p.layout, p.memory, p.step
        sched = {"1f1b": "1f1b", "interleaved_1f1b": f"i1f1b/v{lay.virtual}", "gpipe": "gpipe",
                 "zero_bubble": f"zbh1/v{lay.virtual}", "zbv": "zbv",
                 "dualpipev": "dualpipev"}[lay.pp_schedule]
        time = (f"{st.bubble:6.1%} {st.step_s:7.2f} {st.mfu:6.1%} {st.tokens_per_s / 1e6:7.2f}" if st
                else f"{'-':>6} {'-':>7} {'-':>6} {'-':>7}")
        sched = sched if lay.pp > 1 else "-"
        mark = f"{rank}=" if ranks.count(rank) > 1 else str(rank)
        row = (f"{mark:>3} {lay.tp:>2} {lay.pp:>2} {sched:<9} {lay.cp:>2} {lay.ep:>2} "
               f"{lay.dp:>4} {lay.dp_mode:<7} {lay.recompute:<9} {lay.micro_batch:>2} | "
               f"{mem.state / GIB:6.1f} {(mem.total - mem.state) / GIB:6.1f} "
               f"{mem.total / GIB:9.1f} | {time}")
        if moe:
            etp = lay.tp if lay.etp == -1 else lay.etp
            row += (f" | {etp:>3} {st.expert_flops / 1e12:7.1f} {st.a2a_bytes / GIB:7.1f} "
                    f"{st.etp_bytes / GIB:7.1f}" if st else f" | {etp:>3} {'-':>7} {'-':>7} {'-':>7}")
        rows.append(row)
    return "\n".join(rows)


def run(argv: list[str]) -> str:
    """The planner's text for `argv` (key=value arguments)."""
    return plan_text(argv)[0]


def plan_text(argv: list[str]) -> tuple[str, bool]:
    """(text, whether a layout fits): the search's table, or one layout's evaluation."""
    a = parse(argv)
    m = _model(a.get("model", "qwen2.5-72b"))
    gpu = GPUS[a.get("gpu", "h100")]
    gpus, seq, gb = _number(a, "gpus", 64), _number(a, "seq", 4096), _number(a, "global_batch", 1024)
    eff = _number(a, "efficiency", DEFAULT_EFFICIENCY, float)
    head = (f"{m.name}: {m.num_params() / 1e9:.1f}B parameters ({m.active_params() / 1e9:.1f}B active), "
            f"{gpus} x {gpu.name}, seq {seq}, global batch {gb} sequences ({gb * seq / 1e6:.1f}M tokens), "
            f"largest GEMMs at {eff:.0%} of {gpu.peak_flops / 1e12:.0f} TFLOP/s, smaller ones by their "
            f"roofline; step times +-{ERROR_BAND:.0%} (ranks within it are ties, '1=')")
    if any(k in a for k in (*LAYOUT_INT, *LAYOUT_STR)):
        kw = {k: _number(a, k, 0) for k in LAYOUT_INT if k in a} | {k: a[k] for k in LAYOUT_STR if k in a}
        kw.setdefault("dp", gpus // (kw.get("tp", 1) * kw.get("pp", 1) * kw.get("cp", 1)))
        moe = routed_experts(m) is not None
        lay = Layout(**{"sequence_parallel": kw.get("tp", 1) > 1, **kw})
        if lay.world != gpus:
            raise ValueError(f"tp x pp x cp x dp = {lay.world} but gpus={gpus}; fix dp or gpus")
        p = evaluate(m, lay, gpu, seq, gb, eff)
        mem = p.memory
        lines = [head, table([p], moe),
                 f"pipeline rank {mem.pp_rank} (the fullest): {mem.params / 1e9:.3f}B parameters held; "
                 f"weights {mem.weights / GIB:.1f}, grads {mem.grads / GIB:.1f}, optimizer "
                 f"{mem.optimizer / GIB:.1f}, activations {mem.activations / GIB:.1f} ({mem.in_flight:.2f} "
                 f"micro-batches in flight), transients {mem.margin / GIB:.1f}"
                 + (f", gathered parameters {mem.gathered / GIB:.1f}" if mem.gathered else "")
                 + (f", DDP gradient buckets {mem.buffers / GIB:.1f}" if mem.buffers else "") + " GiB; "
                 + ("fits" if mem.fits else "DOES NOT FIT") + f" in 90% of {gpu.memory_bytes / GIB:.1f} GiB"]
        if p.error:
            lines.append(p.error)
        return "\n".join(lines), mem.fits and p.step is not None
    rejected = Rejected()
    plans = search(m, gpus, gpu, seq, gb, eff, rejected)
    if not plans:
        return head + "\n" + rejected.explain(gpus, gb), False
    return (head + f"\n{len(plans)} layouts fit; the fastest:\n"
            + table(plans[: _number(a, "top", 15)], routed_experts(m) is not None), True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "scaling":
        from megaqwen.scaling import main as scaling_main

        return scaling_main(argv[1:])
    try:
        text, fits = plan_text(argv)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(text)
    if not fits:
        print(f"{PROG}: no layout fits (the reason is above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
