"""Native KV-cache generation: greedy tokens equal full-sequence argmax decoding (no cache) and
transformers `generate` on the same HF folder, token for token, for a batch of different prompt
lengths (Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE); log-probs equal the trainer's `token_logprobs`; sampling with a
seed is reproducible; top-k=1 is greedy; stop tokens end their row only."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hf_models import dtype, save_random_hf

from megaqwen.generate import SamplingParams, build_engine
from megaqwen.generate.loading import load_model

PROMPTS = [[5, 17, 3, 99, 42, 8, 1], [7], [11, 12, 13, 14], [100, 2]]  # lengths 7, 1, 4, 2
NEW = 9


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "qwen2_moe", "qwen3_moe"])
def hf_dir(request, tmp_path_factory):
    return save_random_hf(tmp_path_factory.mktemp(request.param) / "hf", request.param), request.param


def argmax_no_cache(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def hf_generate(hf_dir, prompts, n) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype="auto").eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def test_greedy_equals_no_cache_argmax_and_transformers(hf_dir):
    hf_dir, arch = hf_dir
    model = load_model(hf_dir, dtype=dtype(arch))
    outs = build_engine("native", model).generate(PROMPTS, SamplingParams(max_new_tokens=NEW, greedy=True))
    got = [o.token_ids for o in outs]
    assert [argmax_no_cache(model, p, NEW) for p in PROMPTS] == got
    assert hf_generate(hf_dir, PROMPTS, NEW) == got
    assert all(o.finish_reason == "length" and len(o.logprobs) == NEW for o in outs)
    assert len({tuple(g) for g in got}) > 1  # the rows really differ (not one repeated token)
    # the hf engine (transformers generate behind the Engine interface) gives the same tokens and
    # the same log-probs
    ref = build_engine("hf", path=hf_dir).generate(PROMPTS, SamplingParams(max_new_tokens=NEW, greedy=True))
    assert [o.token_ids for o in ref] == got
    for a, b in zip(outs, ref):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < (1e-9 if "moe" not in arch else 1e-4)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return load_model(save_random_hf(tmp_path_factory.mktemp("q2") / "hf", "qwen2"), dtype=torch.float64)


def test_logprobs_are_the_trainers_token_logprobs(qwen2):
    outs = build_engine("native", qwen2).generate(PROMPTS, SamplingParams(max_new_tokens=6, seed=3))
    for o in outs:
        seq = torch.tensor([o.prompt_ids + o.token_ids])
        with torch.no_grad():
            h = qwen2.hidden_states(seq[:, :-1], torch.arange(seq.shape[1] - 1)[None])
            lp = qwen2.token_logprobs(h, seq[:, 1:])[0, len(o.prompt_ids) - 1:]
        assert torch.allclose(lp, torch.tensor(o.logprobs, dtype=lp.dtype), atol=1e-9)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(qwen2):
    eng = build_engine("native", qwen2)
    p = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    a, b = eng.generate(PROMPTS, p), eng.generate(PROMPTS, p)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=8))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    greedy = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, greedy=True))
    top1 = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1, seed=1))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    qwen2.train()
    eng.generate(PROMPTS[:1], p)
    assert qwen2.training  # generation runs in eval mode and restores the caller's mode
    qwen2.eval()


def test_row_seeds_sample_each_row_as_a_call_of_its_own(qwen2):
    """SamplingParams.row_seeds: one batched call (rows of different lengths, stopping at different
    steps) gives each row the tokens of a one-row call with that row's seed; the hf engine refuses it."""
    eng = build_engine("native", qwen2)
    seeds = (11, 12, 13, 14)[:len(PROMPTS)]
    stop = (5,)
    p = SamplingParams(max_new_tokens=8, temperature=1.3, row_seeds=seeds, stop_token_ids=stop)
    batched = eng.generate(PROMPTS, p)
    alone = [eng.generate([q], SamplingParams(max_new_tokens=8, temperature=1.3, row_seeds=(s,),
                                              stop_token_ids=stop))[0] for q, s in zip(PROMPTS, seeds)]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    swapped = eng.generate(PROMPTS[::-1], replace(p, row_seeds=seeds[::-1]))
    assert [o.token_ids for o in swapped[::-1]] == [o.token_ids for o in batched]
    with pytest.raises(ValueError, match="row_seeds for"):
        eng.generate(PROMPTS, replace(p, row_seeds=seeds[:1]))


def test_stop_tokens_end_their_row_only(qwen2):
    eng = build_engine("native", qwen2)
    full = eng.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, greedy=True))
    stop = full[2].token_ids[3]  # row 2 stops at its 4th token (or earlier if it repeats)
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, greedy=True, stop_token_ids=(stop,)))
    for f, o in zip(full, outs):
        if stop in f.token_ids:
            cut = f.token_ids.index(stop) + 1
            assert o.token_ids == f.token_ids[:cut] and o.finish_reason == "stop"
            assert o.logprobs == pytest.approx(f.logprobs[:cut], abs=1e-9)
        else:  # rows still running after others were dropped from the cache are unchanged
            assert o.token_ids == f.token_ids and o.finish_reason == "length"
    assert outs[2].finish_reason == "stop" and len(outs[2].token_ids) <= 4


def test_top_p_keeps_the_nucleus():
    from megaqwen.generate.sampling import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, SamplingParams(top_p=0.8)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = filter_logits(logits, SamplingParams(top_p=0.81)).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    kept = filter_logits(logits, SamplingParams(top_k=3)).isfinite()
    assert kept.tolist() == [[True, True, True, False]]


def test_bad_requests_are_named(qwen2):
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        build_engine("native", qwen2).generate([[1], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="unknown"):
        build_engine("beam", qwen2)


def test_draw_follows_the_distribution():
    from megaqwen.generate.sampling import draw

    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05]).expand(40_000, 5)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0)), minlength=5).double() / 40_000
    assert counts[1] == 0  # a zero-probability token is never drawn
    assert torch.allclose(counts, probs[0].double(), atol=0.01)  # 4 sigma of the largest share


def test_compiled_layers_generate_eagerly(qwen2):
    params = SamplingParams(max_new_tokens=5, greedy=True)
    want = [o.token_ids for o in build_engine("native", qwen2).generate(PROMPTS, params)]
    for layer in qwen2.model.layers.values():
        layer.compile()  # as parallel.compile does
    try:
        torch._dynamo.reset()
        got = [o.token_ids for o in build_engine("native", qwen2).generate(PROMPTS, params)]
        assert got == want
        assert not torch._dynamo.utils.counters["stats"]["calls_captured"]  # nothing was compiled
    finally:
        for layer in qwen2.model.layers.values():
            layer._compiled_call_impl = None


def test_pipeline_stages_and_sequence_parallelism_are_refused(tmp_path):
    from megaqwen.parallel.tensor_parallel import SequenceParallelRMSNorm

    hf_dir = save_random_hf(tmp_path / "hf", "qwen2")
    stage = load_model(hf_dir)
    stage.model.norm = None  # a first pipeline stage: no final norm, no head
    with pytest.raises(ValueError, match="pipeline stage .*vllm"):
        build_engine("native", stage)
    sp = load_model(hf_dir)
    ln = sp.model.layers["0"].input_layernorm
    sp.model.layers["0"].input_layernorm = SequenceParallelRMSNorm(ln.weight, ln.eps, ln.ops.rms_norm, None)
    with pytest.raises(ValueError, match="sequence parallelism.*sequence_parallel=false"):
        build_engine("native", sp)
    with pytest.raises(ValueError, match="head=.score"):
        from megaqwen.models.spec import get_spec

        cfg = sp.cfg.__class__(**{**sp.cfg.to_dict(), "head": "score", "tie_word_embeddings": False})
        build_engine("native", get_spec(cfg).build(cfg, seed=0))
