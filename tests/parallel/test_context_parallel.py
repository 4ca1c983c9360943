"""Context parallelism (ring and all-to-all, zig-zag shards, packed documents) == one process.

Attention level: outputs and q/k/v gradients of cp in {2, 4} equal SDPA on the whole sequence with
the document mask (fp32). Model level: the debug model's first 3 losses and first gradients at
cp=2, cp=4, cp=2 x tp=2 (also with SP and selective recomputation) and cp=2 x dp=2 (DDP, and
FSDP2 with full recomputation) equal one process. Zig-zag balances causal work across ranks
(contiguous shards would not).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_harness import gather_full, spawn
from trainer_harness import build_run, capture_grads, layout_config, micro_batches, reference_adamw, run_steps

from megaqwen.kernels.attention import AttentionMeta, sdpa_attention
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.context_parallel import (
    ContextParallelMeta,
    alltoall_attention,
    apply_context_parallel,
    context_parallel_attention,
    gather_sequence,
    ring_attention,
    shard_batch,
    shard_sequence,
    unshard_sequence,
    zigzag_index,
)
from megaqwen.parallel.dims import ParallelDims
from megaqwen.train.config import TrainConfig
from megaqwen.train.forward import validation_parts

RTOL = 1e-5  # fp32: max |x - ref| / max |ref|
B, T, HQ, HK, D = 2, 48, 4, 2, 8  # attention tests; T divisible by 2*cp for cp in {2, 4}
MODEL_T, STEPS, SEED, LR = 32, 3, 1234, 3e-3


def packed_documents(b: int, t: int, seed: int) -> torch.Tensor:
    """(b, t) document ids with random boundaries (row 0 many short documents crossing the zig-zag
    chunks, the last row one document: plain causal)."""
    g = torch.Generator().manual_seed(seed)
    docs = (torch.rand(b, t, generator=g) < 0.12).long().cumsum(1)
    docs[-1] = 0
    return docs


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


# ------------------------------------------------------------------------------ single process


def test_zigzag_layout_and_round_trip():
    assert zigzag_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert zigzag_index(16, 4, 3).tolist() == [6, 7, 8, 9]
    x = torch.arange(3 * 24).view(3, 24)
    for cp in (1, 2, 3, 4):
        pieces = [shard_sequence(x, cp, r) for r in range(cp)]
        assert torch.equal(unshard_sequence(pieces), x)
    batch = {"tokens": x, "labels": x + 1, "position_ids": x % 5, "document_ids": x // 7, "n": 3}
    local = shard_batch(batch, 4, 1)
    assert local["n"] == 3 and torch.equal(local["tokens"][:, :3], x[:, 3:6])
    assert torch.equal(local["position_ids"], x[:, zigzag_index(24, 4, 1)] % 5)


def test_seq_len_not_divisible_is_refused():
    with pytest.raises(ValueError, match=r"seq_len=36 is not divisible by 2\*cp=8"):
        zigzag_index(36, 4, 0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
@pytest.mark.parametrize("tile", [2, 5, 1024])
def test_tiled_attention_equals_sdpa(tile, fused, monkeypatch):
    """The ring's tiled kernel on one rank (no communication): every tile kind (skipped, fully
    visible, masked, rows masked entirely) against SDPA, fp64 to rounding and fp32; fully visible
    tiles through the fused CPU kernel and through the PyTorch tile."""
    import megaqwen.parallel.cp_flash_tiles as tiles

    monkeypatch.setattr(tiles, "FUSED_TILES", fused)
    g = torch.Generator().manual_seed(tile)
    docs = packed_documents(B, 37, seed=tile)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, RTOL)):
        q, k, v = (torch.randn(B, 37, h, D, generator=g, dtype=dtype, requires_grad=True)
                   for h in (HQ, HK, HK))
        for d in (docs, None):
            out = ring_attention(q, k, v, ContextParallelMeta(d, None, shape=(B, 37), tile=tile), None)
            ref = sdpa_attention(q, k, v, None if d is None else AttentionMeta(d))
            dout = torch.randn(out.shape, generator=g, dtype=dtype)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            refs = torch.autograd.grad(ref, (q, k, v), dout)
            assert _rel(out, ref) <= tol
            for name, a, r in zip("qkv", grads, refs):
                assert _rel(a, r) <= tol, (name, dtype, d is None)


def test_tiled_attention_bf16_matches_fp32_reference():
    """bf16 inputs (fp32 tiles inside) are as close to the fp32 result as SDPA in bf16 is."""
    g = torch.Generator().manual_seed(0)
    docs = packed_documents(B, 64, seed=1)
    q, k, v = (torch.randn(B, 64, h, D, generator=g) for h in (HQ, HK, HK))
    ref = sdpa_attention(q, k, v, AttentionMeta(docs))
    half = [x.bfloat16() for x in (q, k, v)]
    out = ring_attention(*half, ContextParallelMeta(docs, None, shape=(B, 64), tile=16), None)
    assert out.dtype == torch.bfloat16
    sdpa_err = _rel(sdpa_attention(*half, AttentionMeta(docs)).float(), ref)
    assert _rel(out.float(), ref) <= max(2 * sdpa_err, 1e-2)


def test_cp_mode_is_checked():
    cfg = get_config("debug", vocab_size=1024)
    spec = get_spec(cfg)
    with pytest.raises(ValueError, match=r"parallel.cp_mode='ulysses' is not one of ring \| alltoall"):
        apply_context_parallel(spec.build(cfg, device="meta"), spec, None, "ulysses")


def test_cp_meta_refuses_plain_backends():
    meta = ContextParallelMeta(torch.zeros(1, 8, dtype=torch.long), None)
    with pytest.raises(RuntimeError, match="context-parallel attention core"):
        meta.dense_mask()


# ------------------------------------------------------------------------------ attention level


def _attention_case(group, mode: str, docs: torch.Tensor | None, tile: int, seed: int) -> dict:
    """Errors of cp attention on this group vs SDPA on the whole sequence (every rank computes the
    reference from the same seed; gathered results compared on each)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (HQ, HK, HK))
    dout = torch.randn(B, T, HQ, D, generator=g)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = sdpa_attention(*full, None if docs is None else AttentionMeta(docs))
    ref_grads = torch.autograd.grad(ref, full, dout)

    local = [shard_sequence(x, cp, rank).requires_grad_() for x in (q, k, v)]
    meta = ContextParallelMeta(docs, group, shape=(B, T), tile=tile, count_work=True)
    if mode == "ring":
        out = ring_attention(*local, meta, group)
    else:
        out = alltoall_attention(*local, meta, group, sdpa_attention)
    grads = torch.autograd.grad(out, local, shard_sequence(dout, cp, rank))
    errs = {"out": _rel(gather_sequence(out.detach(), group), ref)}
    for name, a, r in zip("qkv", grads, ref_grads):
        errs[f"d{name}"] = _rel(gather_sequence(a, group), r)
    return {"errs": errs, "work": meta.work["unmasked"], "computed": meta.work["computed"]}


def _gather_ints(x: int, group) -> list[int]:
    out = [torch.zeros((), dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, torch.tensor(x), group=group)
    return [int(v) for v in out]


def attention_worker(rank: int, world: int) -> dict:
    cp = world  # one cp group of every rank
    mesh = ParallelDims(world_size=world, cp=cp).build_mesh("cpu")
    group = mesh.group("cp")
    docs = packed_documents(B, T, seed=7)
    out: dict = {}
    for mode, tiles in (("ring", (5, 1024)), ("alltoall", (1024,))):
        for name, d in (("docs", docs), ("causal", None)):
            for tile in tiles:
                res = _attention_case(group, mode, d, tile, seed=3)
                out[f"cp{cp}-{mode}-{name}-tile{tile}"] = res["errs"]

    # work per rank: causal, tiles of one zig-zag chunk (what a real tile plan looks like at scale)
    res = _attention_case(group, "ring", None, T // (2 * cp), seed=3)
    out["work"] = _gather_ints(res["work"], group)
    out["computed"] = _gather_ints(res["computed"], group)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out["zigzag_dense"] = [B * int(causal[zigzag_index(T, cp, r)].sum()) for r in range(cp)]
    out["contiguous_dense"] = [B * int(causal.chunk(cp)[r].sum()) for r in range(cp)]

    errors = {}
    x = torch.zeros(1, T // cp, 6, D)
    try:  # 6 query heads: not divisible by cp=4 for all-to-all
        alltoall_attention(x, x[:, :, :2], x[:, :, :2], ContextParallelMeta(None, group, (1, T)), group,
                           sdpa_attention)
    except ValueError as e:
        errors["heads"] = str(e)
    try:  # a plain AttentionMeta reaching a CP core
        context_parallel_attention(x, x, x, AttentionMeta(docs), group, "ring", sdpa_attention, 1.0)
    except ValueError as e:
        errors["meta"] = str(e)
    out["errors"] = errors
    return out


def _check_attention(res: dict, cp: int) -> None:
    assert sum(k.startswith(f"cp{cp}-") for k in res) == 6  # ring x 2 tiles + alltoall, docs/causal
    for key, errs in res.items():
        if key.startswith(f"cp{cp}-"):
            for name, e in errs.items():
                assert e <= RTOL, (key, name, e)
    work, dense = res["work"], res["zigzag_dense"]
    assert work == dense  # pairs the ring counted == the causal mask's pairs in each rank's rows
    mean = sum(work) / cp
    assert max(abs(w / mean - 1) for w in work) <= 0.10, work
    # the same check on contiguous shards fails: what zig-zag is for
    mean_c = sum(res["contiguous_dense"]) / cp
    assert max(abs(w / mean_c - 1) for w in res["contiguous_dense"]) > 0.10
    assert max(res["computed"]) == min(res["computed"])  # tiles of a chunk: equal computed area too
    assert "context parallelism needs the batch's ContextParallelMeta" in res["errors"]["meta"]
    if cp == 4:
        assert "6 query heads (per tp rank) are not divisible by cp=4" in res["errors"]["heads"]
    else:
        assert "heads" not in res["errors"]  # 6 heads split over cp=2


# ------------------------------------------------------------------------------ model level


def model_batches(cfg, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """STEPS global batches (2, MODEL_T) of packed documents: positions restart per document, some
    labels ignored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(STEPS):
        ids = torch.randint(0, cfg.vocab_size, (2, MODEL_T + 1), generator=g)
        docs = packed_documents(2, MODEL_T, seed=seed + s)
        starts = torch.zeros_like(docs, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
        idx = torch.arange(MODEL_T).expand_as(docs)
        first = torch.where(starts, idx, 0).cummax(1).values
        labels = ids[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=g) < 0.1] = -100
        out.append({"tokens": ids[:, :-1], "labels": labels, "position_ids": idx - first,
                    "document_ids": docs})
    return out


def model_reference(cfg) -> dict:
    """One process, plain PyTorch: the whole global batch per step, the runs' AdamW settings."""
    model = get_spec(cfg).build(cfg, seed=SEED)  # the config's architecture
    opt = reference_adamw(model, TrainConfig(lr=LR))
    losses, grads = [], {}
    for s, b in enumerate(model_batches(cfg)):
        loss = model(b["tokens"], b["labels"], b["position_ids"], AttentionMeta(b["document_ids"])).mean()
        loss.backward()
        if s == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads}


def run_model_layout(cfg, world: int, tp: int, cp: int, dp: int, mode: str, ref: dict,
                     sp: bool = False, recompute: str = "none", dp_mode: str = "ddp") -> dict:
    """The layout as a run of the trainer (its Config and builders: meta -> TP/SP -> CP -> recompute
    -> [FSDP2] -> materialise -> [DDP], both over dp x cp; its `train_step`): each dp rank its rows
    of the global batch, each cp rank its zig-zag shard of them."""
    pcfg = ParallelConfig(tp=tp, cp=cp, dp=dp, cp_mode=mode, sequence_parallel=sp, recompute=recompute,
                          dp_mode=dp_mode)
    run = build_run(layout_config(cfg, pcfg, STEPS, 2, 2 // dp, MODEL_T, LR, SEED, documents=True))
    seen = capture_grads(run, gather_full)
    batches = model_batches(cfg)
    metrics = run_steps(run, batches)
    grad_err = max(_rel(g, ref["grads"][n]) for n, g in seen["grads"].items())
    # the validation path: the loss parts of this dp rank's rows summed over its cp shards
    rows = next(micro_batches(batches, run.cfg, run.env))
    with torch.no_grad():
        summed = validation_parts(run.model, rows, run.cfg, run.env)
    losses = [m["loss"] for m in metrics]
    rel = max(abs(a - r) / abs(r) for a, r in zip(losses, ref["losses"]))
    kinds = {type(m).__name__ for m in run.plain.modules()}
    return {"loss_rel": rel, "losses": losses, "grad_err": grad_err, "kinds": kinds,
            "counts_ok": int(summed.count) == int((rows["labels"] != -100).sum()),
            "names_kept": [n for n, _ in run.plain.named_parameters()] == list(ref["grads"])}


def model_worker(rank: int, world: int, layouts: list[tuple]) -> dict:
    cfg = get_config("debug", vocab_size=1024)
    ref = model_reference(cfg)
    out = {"ref": ref["losses"]}
    for tp, cp, dp, mode, sp, recompute, dp_mode in layouts:
        name = f"tp{tp}-cp{cp}-dp{dp}-{dp_mode}-{mode}" + ("-sp" if sp else "") + f"-rc{recompute}"
        out[name] = run_model_layout(cfg, world, tp, cp, dp, mode, ref, sp, recompute, dp_mode)
    return out


def _check_model(res: dict) -> None:
    for name, r in res.items():
        if name == "ref":
            continue
        assert r["loss_rel"] <= RTOL, (name, r["losses"], res["ref"])
        assert r["grad_err"] <= RTOL, (name, r["grad_err"])
        assert r["names_kept"], name
        assert r["counts_ok"], (name, "token counts summed over cp != the rows' count")
        assert "ContextParallelAttention" in r["kinds"] or "RecomputeContextParallelAttention" in r["kinds"]


def _both(rank: int, world: int, layouts: list[tuple]) -> dict:
    out = attention_worker(rank, world)
    out["model"] = model_worker(rank, world, layouts)
    return out


@pytest.mark.distributed
def test_cp2_ring_and_alltoall():
    layouts = [(1, 2, 1, "ring", False, "none", "ddp"), (1, 2, 1, "alltoall", False, "none", "ddp")]
    res = spawn(_both, 2, layouts)
    _check_attention(res, 2)
    _check_model(res["model"])


@pytest.mark.distributed
def test_cp4_and_cp2_with_tp_and_dp():
    # (tp, cp, dp, cp mode, sequence parallel, recompute, dp mode)
    layouts = [(1, 4, 1, "ring", False, "none", "ddp"), (1, 4, 1, "alltoall", False, "none", "ddp"),
               (2, 2, 1, "ring", False, "none", "ddp"), (2, 2, 1, "alltoall", True, "selective", "ddp"),
               (2, 2, 1, "ring", True, "selective", "ddp"), (1, 2, 2, "ring", False, "none", "ddp"),
               (1, 2, 2, "alltoall", False, "none", "ddp"), (1, 2, 2, "ring", False, "full", "fsdp")]
    res = spawn(_both, 4, layouts)
    _check_attention(res, 4)
    _check_model(res["model"])
