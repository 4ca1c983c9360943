"""One GPU acceptance run (issue 25): every GPU-only choice measured once, in one JSON and one table.

    bash benchmarks/gpu_acceptance.sh                        # one H100: ~8 min, writes runs/gpu_acceptance/
    .venv/bin/python benchmarks/gpu_acceptance.py --dry-run  # CPU: every step wired, on tiny shapes

Steps (each with a time budget, BUDGET_S; a case the budget, the device or a missing package rules
out is a row with status "skipped" and the reason; a case that raises is "failed", and the exit
status is 1 if any did):

  kernels           RMSNorm, SwiGLU, RoPE: Triton vs the PyTorch reference (time, error) and the
                    bytes an ideal kernel moves / time vs a device-to-device copy's bandwidth
  cross_entropy     chunked linear + CE vs the naive full-logits one: time, peak memory, loss
  attention         flash-attn / Transformer Engine / SDPA on packed documents: fwd+bwd time, peak
                    memory, error vs fp32 SDPA with the same document mask
  train_step        the trainer's own build and `train_step` (bf16, and FP8 via train.fp8) for
                    Qwen2.5-0.5B and 1.5B, compile on and off: tokens/s, MFU, peak memory; 7B
                    (full recomputation) when the planner says one GPU holds it
  context_parallel  ring attention's tiles (flash-attn tiles when installed) on one device vs one
                    whole-sequence attention call at 32K tokens (a real cp>1 ring needs >1 GPU)
  moe               routed experts' grouped GEMM (torch._grouped_mm) vs the per-expert loop

--dry-run runs every case on CPU with tiny shapes (the debug model, 64-token sequences), fp32; the
compile rows are built but not stepped (on CPU they would only cost compile time). Its purpose is
that the GPU mode, which runs the same functions, is ready to run as is.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BUDGET_S = {"kernels": 45, "cross_entropy": 30, "attention": 40, "train_step": 230,
            "context_parallel": 45, "moe": 30}
"""Seconds per step on one H100 (sum 420 s + start-up, under the 8 minutes the issue allows)."""
H100_BF16_FLOPS = 989e12
FP8_RECIPE = "tensorwise"


@dataclass
class Ctx:
    dry: bool
    device: torch.device
    peak_flops: float
    step: str = ""
    step_start: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def over_budget(self) -> str | None:
        spent = time.perf_counter() - self.step_start
        budget = BUDGET_S[self.step]
        return None if spent < budget else f"time budget of {self.step} ({budget} s) spent"

    def case(self, name: str, impl: str, run: Callable[[], dict[str, Any]] | None = None,
             skip: str | None = None) -> None:
        """One row: `run()` -> measured fields, unless `skip` (a reason) or the budget rules it out."""
        row: dict[str, Any] = {"step": self.step, "case": name, "impl": impl}
        skip = skip or (None if self.dry else self.over_budget())  # a dry run runs every case
        if skip is not None:
            row.update(status="skipped", reason=skip)
        else:
            try:
                row.update(status="ok", **run())
            except Exception as e:  # the row says what broke; the other cases still run
                row.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
                traceback.print_exc()
            if self.cuda:
                torch.cuda.empty_cache()
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("step",)}
        print(f"[{self.step}] {json.dumps(shown, default=str)}", flush=True)


# ---------------------------------------------------------------------------------------------
# measuring


def timed(ctx: Ctx, fn: Callable[[], Any], warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call (a dry run: one call, no warm-up; it checks wiring, not speed)."""
    warmup, iters = (0, 1) if ctx.dry else (warmup, iters)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if ctx.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if ctx.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_mib(ctx: Ctx, fn: Callable[[], Any]) -> float | None:
    """Peak CUDA memory above what was allocated before one call of `fn` (None on CPU)."""
    if not ctx.cuda:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def copy_bandwidth(ctx: Ctx) -> float:
    """Bytes/s of a device-to-device copy (1 GiB; 16 MiB in a dry run): the memory-bound ceiling."""
    src = torch.empty(2**24 if ctx.dry else 2**30, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(ctx, lambda: dst.copy_(src))


# ---------------------------------------------------------------------------------------------
# steps


def step_kernels(ctx: Ctx) -> None:
    from megaqwen.kernels._triton import triton_unavailable_reason
    from megaqwen.kernels.rmsnorm import rms_norm_ref, rms_norm_triton
    from megaqwen.kernels.rope import apply_rope_ref, apply_rope_triton, rope_cos_sin, rope_inv_freq
    from megaqwen.kernels.swiglu import swiglu_ref, swiglu_triton

    # Qwen2.5-1.5B shapes, 16K tokens (a 4 x 4096 micro-batch)
    n, h, i, hq, hk = (64, 64, 176, 4, 2) if ctx.dry else (16384, 1536, 8960, 12, 2)
    dt = torch.float32 if ctx.dry else torch.bfloat16
    e, dev, d = torch.empty((), dtype=dt).element_size(), ctx.device, h // hq
    bw = copy_bandwidth(ctx)
    x = torch.randn(n, h, dtype=dt, device=dev, requires_grad=True)
    w = torch.ones(h, dtype=dt, device=dev, requires_grad=True)
    g = torch.randn(n, i, dtype=dt, device=dev, requires_grad=True)
    u = torch.randn(n, i, dtype=dt, device=dev, requires_grad=True)
    q = torch.randn(1, n, hq, d, dtype=dt, device=dev)
    k = torch.randn(1, n, hk, d, dtype=dt, device=dev)
    cos, sin = rope_cos_sin(torch.arange(n, device=dev)[None], rope_inv_freq(d, 1e6, dev))
    dy_n, dy_s = torch.randn_like(x), torch.randn_like(g)
    grad = torch.autograd.grad  # .backward() would add a read-modify-write of .grad per call

    def rope(f, fresh: bool = False):
        if fresh:  # the Triton RoPE works in place: fresh copies when results are compared
            return f(q.clone(), k.clone(), cos, sin)
        return f(q, k, cos, sin)

    # (case, call, implementations, bytes an ideal kernel moves)
    cases = [
        ("rmsnorm fwd", lambda f: f(x, w, 1e-6), (rms_norm_ref, rms_norm_triton), 2 * n * h * e),
        ("rmsnorm fwd+bwd", lambda f: grad(f(x, w, 1e-6), (x, w), dy_n), (rms_norm_ref, rms_norm_triton),
         5 * n * h * e),
        ("swiglu fwd", lambda f: f(g, u), (swiglu_ref, swiglu_triton), 3 * n * i * e),
        ("swiglu fwd+bwd", lambda f: grad(f(g, u), (g, u), dy_s), (swiglu_ref, swiglu_triton), 8 * n * i * e),
        ("rope fwd (q,k)", rope, (apply_rope_ref, apply_rope_triton),
         2 * n * (hq + hk) * d * e + 2 * n * d * 4),
    ]
    triton_skip = triton_unavailable_reason(ctx.device.type)
    if ctx.dry and triton_skip is None:
        triton_skip = "dry run: Triton on CPU needs the interpreter"
    for name, call, (ref, fused), nbytes in cases:
        ref_t = timed(ctx, lambda call=call, ref=ref: call(ref))

        def measure(call=call, f=ref, ref=ref, nbytes=nbytes, ref_t=ref_t, same=False):
            t = ref_t if same else timed(ctx, lambda: call(f))
            check = (lambda g: call(g, fresh=True)) if call is rope else call
            out, want = check(f), check(ref)
            out, want = (out[0], want[0]) if isinstance(out, tuple) else (out, want)
            return {"time_us": t * 1e6, "gb_s": nbytes / t / 1e9, "of_copy_bw": nbytes / t / bw,
                    "speedup_vs_torch": ref_t / t, "rel_err_vs_torch": rel_err(out, want)}

        ctx.case(name, "torch", lambda m=measure: m(same=True))
        ctx.case(name, "triton", lambda m=measure, f=fused: m(f=f), skip=triton_skip)
    ctx.rows.append({"step": ctx.step, "case": "copy bandwidth", "impl": "copy_", "status": "ok",
                     "gb_s": bw / 1e9})


def step_cross_entropy(ctx: Ctx) -> None:
    from megaqwen.kernels.cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_ref

    n, h, v = (128, 64, 1024) if ctx.dry else (8192, 1536, 151_936)
    dt = torch.float32 if ctx.dry else torch.bfloat16
    hid = (torch.randn(n, h, dtype=dt, device=ctx.device) * 0.5).requires_grad_()
    w = (torch.randn(v, h, dtype=dt, device=ctx.device) * 0.02).requires_grad_()
    y = torch.randint(0, v, (n,), device=ctx.device)
    backend = "triton" if ctx.cuda else "torch"
    impls = {"naive": linear_cross_entropy_ref,
             "chunked": lambda *a: linear_cross_entropy_chunked(*a, backend=backend)}
    base: dict[str, float] = {}
    for name, f in impls.items():
        def run(f=f, name=name):
            call = lambda: torch.autograd.grad(f(hid, w, y), (hid, w))  # noqa: E731
            t = timed(ctx, call, warmup=1, iters=3)
            mem = peak_mib(ctx, call)
            loss = f(hid, w, y).item()
            base.setdefault("t", t), base.setdefault("mem", mem or 0.0), base.setdefault("loss", loss)
            out = {"time_ms": t * 1e3, "peak_mib": mem, "loss": loss, "time_vs_naive": t / base["t"],
                   "loss_diff_vs_naive": abs(loss - base["loss"])}
            if mem is not None and base["mem"]:
                out["memory_vs_naive"] = mem / base["mem"]
            return out

        ctx.case(f"linear+CE fwd+bwd N={n} V={v}", f"{name} ({backend})" if name == "chunked" else name, run)


def packed_documents(b: int, t: int, mean_len: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(b, t, generator=g) < 1 / mean_len).long().cumsum(1).to(device)


def step_attention(ctx: Ctx) -> None:
    from megaqwen.kernels.attention import AttentionMeta
    from megaqwen.kernels.registry import IMPLS, unavailable_reason

    b, t, hq, hk, d = (2, 64, 4, 2, 16) if ctx.dry else (2, 8192, 12, 2, 128)
    dt = torch.float32 if ctx.dry else torch.bfloat16
    docs = AttentionMeta(packed_documents(b, t, 16 if ctx.dry else 1024, ctx.device))
    g = torch.Generator(device=ctx.device).manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, device=ctx.device, generator=g) for h in (hq, hk, hk))
    dout = torch.randn(b, t, hq, d, device=ctx.device, generator=g)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = IMPLS["attention"]["sdpa"](*full, docs)  # fp32, the same document mask
    ref_grads = torch.autograd.grad(ref, full, dout)
    ins = [x.to(dt).requires_grad_() for x in (q, k, v)]
    flops = 4 * b * hq * d * sum(c * (c + 1) / 2 for c in _doc_lengths(docs.document_ids)) * 3.5 / b
    for name, fn in IMPLS["attention"].items():
        def run(fn=fn):
            call = lambda: torch.autograd.grad(fn(*ins, docs), ins, dout.to(dt))  # noqa: E731
            tm = timed(ctx, call)
            out = fn(*ins, docs)
            grads = call()
            return {"time_ms": tm * 1e3, "tflops_fwd_bwd": flops / tm / 1e12, "peak_mib": peak_mib(ctx, call),
                    "rel_err_out": rel_err(out, ref),
                    "rel_err_grads": max(rel_err(a, r) for a, r in zip(grads, ref_grads))}

        ctx.case(f"packed docs B={b} T={t} Hq={hq} Hk={hk} D={d}", name, run,
                 skip=unavailable_reason(name, ctx.device.type))


def _doc_lengths(document_ids: torch.Tensor) -> list[int]:
    return [int(c) for row in document_ids for c in torch.unique_consecutive(row, return_counts=True)[1]]


def trainer_config(model: str, seq: int, batch: int, dtype: str, device: str, fp8: str, compile_: bool,
                   recompute: str = "none"):
    """The trainer's Config for a one-device benchmark step (no data files, no checkpoints)."""
    from megaqwen.models.config import get_config
    from megaqwen.parallel.config import ParallelConfig
    from megaqwen.train.config import Config, DataConfig, LoggerConfig, TrainConfig, WandbConfig

    overrides = {"vocab_size": 1024} if model == "debug" else {}
    train = dict(steps=10, seq_len=seq, global_batch_size=batch, micro_batch_size=batch, lr=1e-4, min_lr=0.0,
                 schedule="constant", warmup_steps=0, dtype=dtype, device=device, save_every=0,
                 fit_check=False)
    if fp8 != "none":
        train["fp8"] = fp8
    cfg = Config(model=get_config(model, **overrides),
                 parallel=ParallelConfig(compile="true" if compile_ else "false", recompute=recompute),
                 train=TrainConfig(**train), data=DataConfig(),
                 logger=LoggerConfig(wandb=WandbConfig(enabled=False, mode="disabled")))
    cfg.validate()
    return cfg


def build_trainer(cfg):
    """What the trainer's `_train` holds before its loop (the same calls, as tests/parallel/
    trainer_harness.py makes them): model, optimizer, shards, env."""
    from megaqwen.parallel import setup as par
    from megaqwen.train.assemble import build_training, seed_and_ops

    t = cfg.train
    env = par.init_distributed(cfg.parallel, t.device)
    accum = par.accumulation_steps(t.global_batch_size, t.micro_batch_size, env.dp_size)
    plan = par.check_layout(cfg.parallel, env, cfg.model, t.seq_len, t.engine, microbatches=accum)
    built = build_training(cfg, env, seed_and_ops(cfg, env), plan, accum, resuming=False)
    return built, env, accum


def synthetic_batches(cfg, device) -> Iterator[dict[str, torch.Tensor]]:
    b, t, v = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, v, (b, t + 1), generator=g)
        yield {k: x.to(device) for k, x in {"tokens": ids[:, :-1], "labels": ids[:, 1:],
                                            "position_ids": torch.arange(t).expand(b, t).contiguous(),
                                            "document_ids": torch.zeros(b, t, dtype=torch.long)}.items()}


def fp8_unavailable() -> str | None:
    from megaqwen.train.config import TrainConfig

    if "fp8" not in TrainConfig.__dataclass_fields__:
        return "train.fp8 not available"
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        return f"torchao float8 not importable ({e})"
    return None


def train_case(ctx: Ctx, model: str, seq: int, batch: int, dtype: str, fp8: str, compile_: bool,
               recompute: str = "none") -> dict[str, Any]:
    """Build with the trainer's own code, one step (compiles, if on), then timed steps."""
    from megaqwen.train.loop import train_step

    cfg = trainer_config(model, seq, batch, dtype, ctx.device.type, fp8, compile_, recompute)
    built, env, accum = build_trainer(cfg)
    if ctx.dry and compile_:
        return {"note": "dry run: built with compile, not stepped (CPU compile time)"}
    data = synthetic_batches(cfg, env.device)
    counter = iter(range(10**6))

    def step():
        return train_step(built.model, built.optimizer, data, cfg, env, next(counter), accum, built.shards,
                          built.pipe, built.reference)

    t0 = time.perf_counter()
    first = step()  # compilation happens here
    first_s = time.perf_counter() - t0
    if ctx.dry:
        return {"first_step_s": first_s, "loss": first["loss"]}
    tm = timed(ctx, step, warmup=1, iters=3)
    tokens = batch * seq
    return {"tokens_per_s": tokens / tm, "step_s": tm, "first_step_s": first_s,
            "mfu": cfg.model.flops_per_token(seq) * tokens / tm / ctx.peak_flops,
            "peak_mib": peak_mib(ctx, step), "loss": first["loss"]}


def step_train(ctx: Ctx) -> None:
    models = [("debug", 64, 2)] if ctx.dry else [("qwen2.5-0.5b", 4096, 4), ("qwen2.5-1.5b", 4096, 4)]
    dtype = "fp32" if ctx.dry else "bf16"
    fp8_skip = fp8_unavailable()
    for model, seq, batch in models:
        for fp8 in ("none", FP8_RECIPE):
            for compile_ in (False, True):
                label = f"{'bf16' if fp8 == 'none' else 'fp8 ' + fp8}{' +compile' if compile_ else ''}"
                if ctx.dry:
                    label = label.replace("bf16", "fp32")
                ctx.case(f"{model} seq={seq} b={batch}", label,
                         lambda m=model, s=seq, b=batch, f=fp8, c=compile_:
                         train_case(ctx, m, s, b, dtype, f, c),
                         skip=fp8_skip if fp8 != "none" else None)
    big = ("debug", 64, 1) if ctx.dry else ("qwen2.5-7b", 4096, 1)
    ctx.case(f"{big[0]} seq={big[1]} b={big[2]} recompute=full", dtype,
             lambda: train_case(ctx, *big, dtype, "none", False, "full"), skip=_fits(ctx, big[0], big[1]))


def _fits(ctx: Ctx, model: str, seq: int) -> str | None:
    """Why `model` with full recomputation cannot train on this one device (the planner's memory
    model, the trainer's fit check), or None."""
    from megaqwen.models.config import get_config
    from megaqwen.plan.memory import Layout, estimate_memory

    if ctx.dry:
        return None
    est = estimate_memory(get_config(model), Layout(recompute="full"), seq, 1)
    have = torch.cuda.get_device_properties(0).total_memory
    if est.total > have:
        return (f"planner: {model} with full recomputation needs {est.total / 2**30:.0f} GiB on one device "
                f"(fp32 weights, grads and AdamW: 16 B/param), this one has {have / 2**30:.0f} GiB; "
                "FSDP over >= 2 GPUs")
    return None


def step_context_parallel(ctx: Ctx) -> None:
    from megaqwen.kernels.registry import resolve_ops
    from megaqwen.parallel.context_parallel import ContextParallelMeta, ring_attention
    from megaqwen.parallel.cp_flash_tiles import fused_tile_kernel

    b, t, hq, hk, d = (1, 64, 4, 2, 16) if ctx.dry else (1, 32768, 12, 2, 128)
    dt = torch.float32 if ctx.dry else torch.bfloat16
    tile = 16 if ctx.dry else 2048
    g = torch.Generator(device=ctx.device).manual_seed(0)
    ins = [torch.randn(b, t, h, d, device=ctx.device, generator=g, dtype=dt).requires_grad_()
           for h in (hq, hk, hk)]
    dout = torch.randn(b, t, hq, d, device=ctx.device, generator=g, dtype=dt)
    docs = packed_documents(b, t, 16 if ctx.dry else 8192, ctx.device)
    from megaqwen.kernels.attention import AttentionMeta

    whole = resolve_ops(device=ctx.device.type)
    out_ref: dict[str, Any] = {}
    tiles = "flash-attn" if ctx.cuda and fused_tile_kernel(ctx.device) is not None else \
        ("ATen flash (CPU)" if not ctx.cuda else "PyTorch (flash-attn not installed)")

    def one_device():
        call = lambda: torch.autograd.grad(whole.attention(*ins, AttentionMeta(docs)), ins, dout)  # noqa: E731
        tm = timed(ctx, call, warmup=1, iters=2)
        out_ref["out"] = whole.attention(*ins, AttentionMeta(docs)).detach()
        out_ref["t"] = tm
        return {"time_ms": tm * 1e3, "peak_mib": peak_mib(ctx, call)}

    def ring():
        meta = lambda: ContextParallelMeta(docs, None, shape=(b, t), tile=tile)  # noqa: E731
        call = lambda: torch.autograd.grad(ring_attention(*ins, meta(), None), ins, dout)  # noqa: E731
        tm = timed(ctx, call, warmup=1, iters=2)
        out = ring_attention(*ins, meta(), None).detach()
        res = {"time_ms": tm * 1e3, "peak_mib": peak_mib(ctx, call), "tiles": tiles,
               "note": "cp=1 ring (the tile merge a cp>1 rank runs per block); cp>1 needs >1 GPU"}
        if "out" in out_ref:
            res |= {"time_vs_one_device": tm / out_ref["t"],
                    "rel_err_vs_one_device": rel_err(out, out_ref["out"])}
        return res

    shape = f"T={t} B={b} Hq={hq} Hk={hk} D={d}"
    ctx.case(shape, f"one device ({whole.choices['attention']})", one_device)
    ctx.case(shape, f"ring tiles={tile}", ring)


def step_moe(ctx: Ctx) -> None:
    from megaqwen.kernels.moe import expert_mlp_grouped, expert_mlp_loop, grouped_mm_unavailable_reason

    # Qwen3-30B-A3B's experts: H 2048, I 768, 128 experts; 4K tokens x top-8 = 32K assignments
    e, a, h, i = (4, 64, 64, 32) if ctx.dry else (128, 32768, 2048, 768)
    dt = torch.float32 if ctx.dry else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(e), a, replacement=True, generator=g).bincount(minlength=e).tolist()
    x = torch.randn(a, h, device=ctx.device, dtype=dt).requires_grad_()
    ws = [[(torch.randn(o, k, device=ctx.device, dtype=dt) * k ** -0.5).requires_grad_() for _ in range(e)]
          for o, k in ((i, h), (i, h), (h, i))]
    dy = torch.randn(a, h, device=ctx.device, dtype=dt)
    params = [x, *ws[0], *ws[1], *ws[2]]
    want = expert_mlp_loop(x, counts, *ws).detach()
    flops = 3 * 2 * a * 3 * h * i  # fwd + bwd (2x) of the three projections
    base: dict[str, float] = {}
    for name, fn in (("loop", expert_mlp_loop), ("grouped_mm", expert_mlp_grouped)):
        def run(fn=fn):
            call = lambda: torch.autograd.grad(fn(x, counts, *ws), params, dy)  # noqa: E731
            tm = timed(ctx, call)
            base.setdefault("t", tm)
            return {"time_ms": tm * 1e3, "tflops_fwd_bwd": flops / tm / 1e12,
                    "speedup_vs_loop": base["t"] / tm,
                    "peak_mib": peak_mib(ctx, call), "rel_err_vs_loop": rel_err(fn(x, counts, *ws), want)}

        skip = grouped_mm_unavailable_reason(x, h, i) if name == "grouped_mm" else None
        ctx.case(f"experts E={e} A={a} H={h} I={i}", name, run, skip=skip)


STEPS: dict[str, Callable[[Ctx], None]] = {
    "kernels": step_kernels, "cross_entropy": step_cross_entropy, "attention": step_attention,
    "train_step": step_train, "context_parallel": step_context_parallel, "moe": step_moe,
}


# ---------------------------------------------------------------------------------------------
# report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU acceptance ({'dry run, ' if report['dry_run'] else ''}{report['device']})", "",
             f"torch {report['torch']}, {report['total_s']:.0f} s in all, {report['failed']} failed", ""]
    for step, info in report["steps"].items():
        rows = [r for r in report["rows"] if r["step"] == step]
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("step", "status", "reason")]
        lines += [f"## {step} ({info['elapsed_s']:.1f} s of {info['budget_s']} s)", "",
                  "| " + " | ".join([*keys, "status"]) + " |", "|" + "---|" * (len(keys) + 1)]
        for r in rows:
            status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
            lines.append("| " + " | ".join([*(_fmt(r.get(k, "")) for k in keys), status]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check every step is wired")
    p.add_argument("--out", default="runs/gpu_acceptance", help="folder for acceptance.json / acceptance.md")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: 989, the H100 SXM datasheet)")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if a.dry_run else "cuda")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else (platform.processor() or "cpu")
    ctx = Ctx(a.dry_run, device, (a.peak_tflops * 1e12) if a.peak_tflops else H100_BF16_FLOPS)
    from torch._dynamo import config as dynamo_config

    for limit in ("recompile_limit", "cache_size_limit"):  # one compile per model size and recipe
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, 64)
    t_all = time.perf_counter()
    steps: dict[str, dict[str, Any]] = {}
    for step in a.steps:
        ctx.step, ctx.step_start = step, time.perf_counter()
        print(f"== {step} (budget {BUDGET_S[step]} s)", flush=True)
        try:
            STEPS[step](ctx)
        except Exception as e:  # set-up of the step itself failed
            traceback.print_exc()
            ctx.rows.append({"step": step, "case": "(set-up)", "impl": "", "status": "failed",
                             "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
        steps[step] = {"budget_s": BUDGET_S[step], "elapsed_s": time.perf_counter() - ctx.step_start}
    report = {"dry_run": a.dry_run, "device": name, "torch": torch.__version__,
              "peak_flops": ctx.peak_flops, "total_s": time.perf_counter() - t_all, "steps": steps,
              "rows": ctx.rows, "failed": sum(r["status"] == "failed" for r in ctx.rows)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "acceptance.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "acceptance.md").write_text(markdown(report))
    print(f"wrote {out / 'acceptance.json'} and {out / 'acceptance.md'} "
          f"({report['total_s']:.0f} s, {report['failed']} failed)")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
