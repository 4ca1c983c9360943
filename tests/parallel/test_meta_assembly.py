"""Meta-device assembly: plans on meta, then only local pieces materialised or loaded slice by slice.

- 72B / 32B under tp=8 x FSDP dp=8 on a simulated 64-rank world (fake process groups, meta tensors).
- HF safetensors and native DCP checkpoints load into tp / tp x FSDP pieces equal to the source.
- FSDP2 bf16 mixed precision all-gathers bf16 parameters, keeps fp32 masters, tracks fp32 losses.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from parallel_harness import SEED, batches, gather_full, spawn

from megaqwen.models.config import get_config
from megaqwen.models.qwen2 import build_model
from megaqwen.models.spec import get_spec
from megaqwen.parallel.data_parallel import apply_fsdp
from megaqwen.parallel.dims import ParallelDims
from megaqwen.parallel.materialize import load_hf_sharded, materialize
from megaqwen.parallel.shards import local_param_bytes

pytestmark = pytest.mark.distributed


def _assemble(cfg, mesh, fsdp: bool, mp_dtype=None):
    spec = get_spec(cfg)
    model = spec.build(cfg, device="meta")
    shards = spec.parallelize_tp(model, mesh)
    if fsdp:
        apply_fsdp(model, mesh, spec.layers(model), mp_param_dtype=mp_dtype)
    return model, shards


def test_72b_and_32b_assemble_tp8_fsdp8_on_64_fake_ranks():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    t0 = time.perf_counter()
    for name in ("qwen2.5-72b", "qwen2.5-32b"):
        cfg = get_config(name)
        want = 4 * cfg.num_params() / 64  # fp32 bytes of total / (tp * dp)
        for rank in (0, 37, 63):  # first, middle and last rank (FSDP's uneven last chunk)
            dist.init_process_group("fake", rank=rank, world_size=64, store=FakeStore())
            try:
                mesh = ParallelDims(world_size=64, tp=8).build_mesh("cpu")
                model, shards = _assemble(cfg, mesh, fsdp=True)
                assert all(p.device.type == "meta" for p in model.parameters()), "memory was touched"
                got = local_param_bytes(model)
                assert abs(got / want - 1) <= 0.01, (name, rank, got, want)
                # every TP-sharded parameter is recorded, and its pieces tile the full tensor
                # per layer q/k/v weights and biases, o, gate, up, down; then embedding and LM head
                assert len(list(shards)) == 10 * cfg.num_layers + 2
                for fqn, sh in shards:
                    assert sh.length * 8 // sh.replicas == sh.full_shape[sh.dim], fqn
            finally:
                dist.destroy_process_group()
    assert time.perf_counter() - t0 < 120


def _save_hf(model, path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


def loading_worker(rank, world, hf_dir, dcp_dir, overrides):
    from megaqwen.parallel.checkpoint import load_model

    cfg = get_config("debug", **overrides)
    out = {}
    for tp, fsdp in ((2, False), (2, True), (1, True)):
        mesh = ParallelDims(world_size=world, tp=tp).build_mesh("cpu")
        for source in ("hf", "dcp"):
            model, shards = _assemble(cfg, mesh, fsdp)
            model.to_empty(device="cpu")
            if source == "hf":
                load_hf_sharded(model, shards, hf_dir)
            else:
                load_model(dcp_dir, model, shards)
            out[(tp, fsdp, source)] = {n: gather_full(p.detach(), n, shards)
                                       for n, p in model.named_parameters()}
    return out


def test_sharded_loading_from_hf_and_native_checkpoints(tmp_path):
    import torch.distributed.checkpoint as dcp

    overrides = {"vocab_size": 1024, "tie_word_embeddings": False}
    src = build_model(get_config("debug", **overrides), seed=7)
    _save_hf(src, tmp_path / "hf")
    dcp.save({"model": src.state_dict()}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    results = spawn(loading_worker, 4, str(tmp_path / "hf"), str(tmp_path / "dcp"), overrides)
    want = src.state_dict()
    for key, got in results.items():
        assert set(got) == set(want), key
        for n, t in got.items():
            assert torch.equal(t, want[n]), (key, n)


def test_hf_loading_errors_name_the_problem(tmp_path):
    cfg = get_config("debug", vocab_size=1024)
    src = build_model(cfg, seed=1)
    sd = src.state_dict()
    sd.pop("model.norm.weight")
    from safetensors.torch import save_file

    (tmp_path / "a").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "a" / "model.safetensors"))
    model = build_model(cfg, device="meta").to_empty(device="cpu")
    from megaqwen.parallel.shards import ShardMap

    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        load_hf_sharded(model, ShardMap(), tmp_path / "a")
    wrong = build_model(get_config("debug", vocab_size=2048), seed=1)
    _save_hf(wrong, tmp_path / "b")
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape \(2048, 64\).*\(1024, 64\)"):
        load_hf_sharded(model, ShardMap(), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_sharded(model, ShardMap(), tmp_path)


def bf16_worker(rank, world):
    cfg = get_config("debug", vocab_size=1024)
    mesh = ParallelDims(world_size=world).build_mesh("cpu")
    tokens, labels = batches(cfg)
    b = tokens.shape[1] // world
    sl = slice(rank * b, (rank + 1) * b)
    out = {}
    for name, mp in (("fp32", None), ("bf16", torch.bfloat16)):
        model, shards = _assemble(cfg, mesh, fsdp=True, mp_dtype=mp)
        materialize(model, shards, "cpu", seed=SEED)
        seen: list[torch.dtype] = []

        def record(mod, _args, seen=seen):  # inside FSDP's unshard: the dtype computed with
            seen.append(mod.self_attn.q_proj.weight.dtype)

        model.model.layers["0"].register_forward_pre_hook(record)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for s in range(3):
            loss = model(tokens[s, sl], labels[s, sl]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            t = loss.detach().float().clone()
            dist.all_reduce(t)
            losses.append(t.item() / world)
        out[name] = {"losses": losses, "gathered": seen[0],
                     "master": {p.to_local().dtype for p in model.parameters()}}
    return out


def test_fsdp_bf16_gathers_bf16_and_tracks_fp32():
    r = spawn(bf16_worker, 2)
    assert r["bf16"]["gathered"] == torch.bfloat16 and r["fp32"]["gathered"] == torch.float32
    assert r["bf16"]["master"] == {torch.float32}  # sharded master weights stay fp32
    for a, b in zip(r["bf16"]["losses"], r["fp32"]["losses"]):
        assert abs(a / b - 1) <= 2e-2, (r["bf16"]["losses"], r["fp32"]["losses"])  # bf16: ~3 digits
    assert r["bf16"]["losses"] != r["fp32"]["losses"]  # it really ran in bf16
