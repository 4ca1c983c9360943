"""vllm engine: import-guarded; its weight sync (trainer weights -> vLLM `load_weights`, no
checkpoint) checked against a recording fake LLM on CPU; a real-vLLM run only on a GPU."""

from __future__ import annotations

import pytest
import torch
from fake_vllm import fake_llm
from hf_models import save_random_hf

from megaqwen.generate import SamplingParams, build_engine
from megaqwen.generate.loading import load_model
from megaqwen.generate.vllm_engine import VLLMEngine, vllm_unavailable_reason
from megaqwen.models.weights import read_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_random_hf(tmp_path_factory.mktemp("v") / "hf", "qwen3")


def test_weight_sync_streams_the_hf_export_to_load_weights(hf_dir):
    model = load_model(hf_dir, dtype=torch.float64)
    llm = fake_llm()
    engine = VLLMEngine(llm=llm, model=model)  # the constructor pushes the initial weights
    with torch.no_grad():  # an "optimizer step": the next sync must carry the new values
        model.model.layers["1"].self_attn.q_proj.weight.add_(1.0)
    assert engine.sync_weights(model) > 0
    _, want = read_hf(hf_dir)
    first, second = llm.model.calls
    assert [n for n, _ in first] == [n for n, _ in second] and set(dict(first)) == set(want)
    for name, t in first:
        assert t.shape == want[name].shape and torch.equal(t, want[name]), name
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(dict(second)[q], want[q] + 1.0)
    assert llm.resets == 2  # prefix cache dropped after each sync


def test_without_vllm_the_engine_says_why():
    reason = vllm_unavailable_reason()
    if reason is None:
        pytest.skip("vLLM and a GPU are present: the refusal path does not apply")
    with pytest.raises(ImportError, match="engine=vllm"):
        build_engine("vllm", path="unused")


def test_hf_engine_from_the_trainers_model_matches_native(hf_dir):
    model = load_model(hf_dir, dtype=torch.float64)
    params = SamplingParams(max_new_tokens=6, greedy=True)
    prompts = [[3, 4, 5], [9]]
    hf = build_engine("hf", model)  # exported in memory, no folder
    native = build_engine("native", model)
    assert [o.token_ids for o in hf.generate(prompts, params)] == \
        [o.token_ids for o in native.generate(prompts, params)]


@pytest.mark.gpu
@pytest.mark.skipif(vllm_unavailable_reason() is not None,
                    reason=f"needs vLLM on a GPU: {vllm_unavailable_reason()}")
def test_vllm_greedy_equals_native_after_weight_sync(hf_dir):
    model = load_model(hf_dir, dtype=torch.float32, device="cuda")
    engine = build_engine("vllm", model, path=hf_dir, dtype="float32", enforce_eager=True,
                          gpu_memory_utilization=0.3)
    params = SamplingParams(max_new_tokens=8, greedy=True)
    prompts = [[5, 17, 3], [7]]
    assert [o.token_ids for o in engine.generate(prompts, params)] == \
        [o.token_ids for o in build_engine("native", model).generate(prompts, params)]
