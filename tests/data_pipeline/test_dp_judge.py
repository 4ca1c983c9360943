"""The judge's scores are expectations over score-token probabilities, equal across backends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megaqwen.data_pipeline.judge.backends import LocalBackend, OpenAIBackend
from megaqwen.data_pipeline.judge.judge import Judge, expected_scores
from megaqwen.data_pipeline.judge.rubric import SCORE_TOKENS, quality_messages
from megaqwen.data_pipeline.tiny_judge import build_tiny_qwen2
from megaqwen.tokenizer import load_tokenizer

DOCS = [
    "The river rises in the hills north of the town and flows south for forty kilometres.",
    "cheap watches cheap watches buy now",
    "Euclid proved that there are infinitely many primes by multiplying a finite list and adding one.",
]
DIMS = ["educational_value", "coherence"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return build_tiny_qwen2(seed=0)


@pytest.fixture(scope="module")
def peaked(tok):
    """A tiny random model that, like an instruction-tuned judge, puts almost all mass on the digits
    (so they are inside any top-20): a large constant v-bias in the last layer adds a fixed direction
    to every final hidden state, and the digits' output rows point along it."""
    m = build_tiny_qwen2(seed=1)
    ids = [tok.convert_tokens_to_ids(s) for s in SCORE_TOKENS]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        attn = m.model.layers[-1].self_attn
        attn.v_proj.bias.copy_(torch.randn(attn.v_proj.bias.shape, generator=g) * 30)
        h = m.model(input_ids=torch.tensor([tok.encode("any prompt at all")])).last_hidden_state[0, -1]
        head = m.model.embed_tokens.weight.detach().clone()
        head[ids] = 3 * h / h.norm() + 0.3 * torch.randn(6, h.numel(), generator=g)
        m.lm_head.weight = torch.nn.Parameter(head)  # untied from the embedding
    return m


def test_expected_scores_formula():
    p = np.array([[0.1, 0.0, 0.2, 0.3, 0.0, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    with np.errstate(divide="ignore"):
        score, mass = expected_scores(np.log(p))
    np.testing.assert_allclose(score, [(0.2 * 2 + 0.3 * 3 + 0.2 * 5) / 0.8, 5.0])
    np.testing.assert_allclose(mass, [0.8, 1.0])
    assert math.isnan(expected_scores(np.full((1, 6), -np.inf))[0][0])


def test_local_score_is_expectation_of_next_token_probabilities(model, tok):
    judge = Judge(LocalBackend(model=model, tokenizer=tok, batch_size=2), DIMS, max_doc_chars=500)
    got = judge.score(DOCS)
    ids = [tok.convert_tokens_to_ids(s) for s in SCORE_TOKENS]
    for doc, j in zip(DOCS, got):
        for dim in DIMS:
            prompt = tok.apply_chat_template(
                quality_messages(doc, dim, 500), tokenize=False, add_generation_prompt=True
            )
            with torch.no_grad():
                probs = torch.softmax(
                    model(input_ids=torch.tensor([tok.encode(prompt)])).logits[0, -1].double(), -1
                )
            p = probs[ids]
            want = float((p * torch.arange(6, dtype=torch.float64)).sum() / p.sum())
            assert j.scores[dim] == pytest.approx(want, abs=1e-6)
            assert j.mass[dim] == pytest.approx(float(p.sum()), rel=1e-4)
        assert j.scores["overall"] == pytest.approx(np.mean([j.scores[d] for d in DIMS]))


def test_openai_echo_backend_matches_local(model, tok, stub_server):
    local = Judge(LocalBackend(model=model, tokenizer=tok, batch_size=3), DIMS, 500).score(DOCS)
    with stub_server(model, tok) as srv:
        remote = Judge(
            OpenAIBackend(srv.url, "tiny", mode="echo", tokenizer=tok, batch_size=2), DIMS, 500
        ).score(DOCS)
    for a, b in zip(local, remote):
        for d in DIMS + ["overall"]:
            assert a.scores[d] == pytest.approx(b.scores[d], abs=1e-5)
            assert 0.0 <= a.scores[d] <= 5.0


def test_openai_top_logprobs_backend_matches_local(peaked, tok, stub_server):
    local = Judge(LocalBackend(model=peaked, tokenizer=tok, batch_size=3), DIMS, 500).score(DOCS)
    assert min(j.mass[d] for j in local for d in DIMS) > 0.99
    with stub_server(peaked, tok) as srv:
        remote = Judge(OpenAIBackend(srv.url, "tiny", mode="top_logprobs", top_logprobs=20), DIMS, 500).score(
            DOCS
        )
    for a, b in zip(local, remote):
        for d in DIMS:
            assert a.scores[d] == pytest.approx(b.scores[d], abs=1e-5)


def test_domain_probabilities_sum_to_one(model, tok):
    judge = Judge(LocalBackend(model=model, tokenizer=tok), DIMS, 300)
    out = judge.domains(DOCS[:2], {"science": "research", "e-commerce": "shopping", "other": "anything"})
    for probs in out:
        assert set(probs) == {"science", "e-commerce", "other"} and sum(probs.values()) == pytest.approx(1.0)


def test_unreachable_server_error_names_url(tok):
    backend = OpenAIBackend("http://127.0.0.1:9/v1", "x", mode="top_logprobs", timeout_s=2)
    with pytest.raises(RuntimeError, match="127.0.0.1:9"):
        backend.option_logprobs([[{"role": "user", "content": "hi"}]], SCORE_TOKENS)
