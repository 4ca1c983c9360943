"""tp=2 (gloo, 2 ranks): native generation on the tensor-parallel model equals one process (greedy
and seeded sampling, every rank the same tokens), and the vLLM weight sync gathers the tp pieces
back into the HF folder's exact tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from fake_vllm import fake_llm
from hf_models import save_random_hf
from parallel_harness import spawn

from megaqwen.generate import SamplingParams, build_engine
from megaqwen.generate.loading import load_model
from megaqwen.generate.vllm_engine import VLLMEngine
from megaqwen.models.spec import get_spec
from megaqwen.parallel.dims import ParallelDims

PROMPTS = [[5, 17, 3, 99, 42, 8, 1], [7], [11, 12, 13, 14]]
GREEDY = SamplingParams(max_new_tokens=8, greedy=True)
SAMPLED = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11)


def _run(model):
    eng = build_engine("native", model)
    return [[o.token_ids for o in eng.generate(PROMPTS, p)] for p in (GREEDY, SAMPLED)], \
        [o.logprobs for o in eng.generate(PROMPTS, GREEDY)]


def _tp_worker(rank, world, hf_dir):
    model = load_model(hf_dir, dtype=torch.float64)
    mesh = ParallelDims(world_size=world, tp=world).build_mesh("cpu")
    shards = get_spec(model.cfg).parallelize_tp(model, mesh)
    assert model.model.embed_tokens.weight.shape[0] < model.cfg.vocab_size  # really sharded
    tokens, logprobs = _run(model)
    every = [None] * world
    dist.all_gather_object(every, tokens)
    llm = fake_llm() if rank == 0 else False
    pushed = VLLMEngine(llm=llm, shards=shards, tp_group=mesh.tp_group).sync_weights(model)
    calls = llm.model.calls if rank == 0 else None
    return {"tokens": tokens, "logprobs": logprobs, "ranks_agree": all(e == tokens for e in every),
            "calls": calls, "pushed": pushed, "resets": llm.resets if rank == 0 else None}


@pytest.mark.distributed
def test_tp2_generation_equals_one_process_and_weight_sync_gathers_shards(tmp_path):
    from megaqwen.models.weights import read_hf

    hf_dir = save_random_hf(tmp_path / "hf", "qwen2", vocab_size=128)
    ref_tokens, ref_logprobs = _run(load_model(hf_dir, dtype=torch.float64))
    out = spawn(_tp_worker, 2, hf_dir)
    assert out["ranks_agree"]
    assert out["tokens"] == ref_tokens
    for a, b in zip(out["logprobs"], ref_logprobs):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-9
    # one load_weights call streaming every HF tensor, equal to the folder's (tied head: not sent)
    _, want = read_hf(hf_dir)
    (call,) = out["calls"]
    assert [n for n, _ in call] == list(dict(call)) and set(dict(call)) == set(want)
    for name, t in call:
        assert t.shape == want[name].shape and torch.equal(t, want[name].to(t.dtype)), name
    assert out["pushed"] == len(want) and out["resets"] == 1


def _fsdp_worker(rank, world, hf_dir, prompts, stop):
    from megaqwen.parallel.data_parallel import apply_fsdp

    model = load_model(hf_dir, dtype=torch.float64)
    mesh = ParallelDims(world_size=world, dp=world).build_mesh("cpu")
    apply_fsdp(model, mesh, model.model.layers)
    eng = build_engine("native", model, sync_group=dist.group.WORLD)
    params = SamplingParams(max_new_tokens=8, greedy=True, stop_token_ids=(stop,))
    outs = eng.generate(prompts[rank], params)  # different prompts and lengths per rank
    every = [None] * world
    dist.all_gather_object(every, [(o.token_ids, o.finish_reason) for o in outs])
    llm = fake_llm() if rank == 0 else False
    VLLMEngine(llm=llm).sync_weights(model)  # FSDP2 DTensors made whole by full_tensor()
    return {"every": every, "calls": llm.model.calls if rank == 0 else None}


@pytest.mark.distributed
def test_fsdp_ranks_stay_in_lockstep_with_different_prompts(tmp_path):
    """FSDP2 (dp=2) gathers parameters inside every forward, so both ranks must step together
    although one rank's rows stop early: with `sync_group` each still gets one process's tokens."""
    from megaqwen.models.weights import read_hf

    hf_dir = save_random_hf(tmp_path / "hf", "qwen2", vocab_size=128)
    ref_model = load_model(hf_dir, dtype=torch.float64)
    ref_eng = build_engine("native", ref_model)
    free = ref_eng.generate([[7]], SamplingParams(max_new_tokens=8, greedy=True))[0].token_ids
    stop = free[1]  # rank 1's only prompt stops after two tokens; rank 0 runs all 8 steps
    prompts = [[[5, 17, 3, 99], [11, 12]], [[7]]]
    params = SamplingParams(max_new_tokens=8, greedy=True, stop_token_ids=(stop,))
    want = [[(o.token_ids, o.finish_reason) for o in ref_eng.generate(p, params)] for p in prompts]
    out = spawn(_fsdp_worker, 2, hf_dir, prompts, stop)
    assert out["every"] == want
    assert want[1][0][1] == "stop" and len(want[1][0][0]) <= 2
    _, full = read_hf(hf_dir)
    (call,) = out["calls"]
    assert set(dict(call)) == set(full) and all(torch.equal(t, full[n]) for n, t in call)
