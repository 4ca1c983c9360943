"""Long-context evaluation helpers: passkey prompts and scoring, perplexity by context length."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from megaqwen.eval import main as eval_main
from megaqwen.eval_long import passkey_prompt, perplexity_by_length, score_answer
from megaqwen.models import build_model, get_config
from megaqwen.tokenizer import load_tokenizer
from megaqwen.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize("length,depth", [(64, 0.0), (200, 0.5), (333, 1.0)])
def test_passkey_prompt_has_the_length_and_the_needle_at_its_depth(tok, length, depth):
    prompt, answer = passkey_prompt(tok, length, depth, 48213)
    assert len(prompt) + len(answer) == length
    text = tok.decode(prompt)
    assert text.endswith("What is the pass key? The pass key is") and tok.decode(answer) == " 48213"
    at = text.index("The pass key is 48213")
    filler = len(text) - len("The pass key is 48213. Remember it. 48213 is the pass key. ") - 38
    assert abs(at / max(filler, 1) - depth) < 0.25  # whole filler sentences, so only roughly
    with pytest.raises(ValueError, match="below the"):
        passkey_prompt(tok, 20, 0.5, 48213)


def test_score_answer_is_greedy_retrieval():
    """A model that always predicts id + 1 retrieves 8 -> [9, 10] but not [9, 11]; log-probs agree."""

    def successor(ids):  # (1, T) -> logits (1, T, V) with id + 1 on top
        return F.one_hot((ids + 1) % 64, 64).float() * 5.0

    prompt = [5, 6, 7, 8]
    ok, logp = score_answer(successor, prompt, [9, 10], "cpu")
    assert ok and logp == pytest.approx(torch.tensor([5.0] + [0.0] * 63).log_softmax(0)[0].item())
    assert not score_answer(successor, prompt, [9, 11], "cpu")[0]
    model = build_model(get_config("debug", vocab_size=64, num_layers=1), seed=0).eval()
    assert score_answer(model, prompt, [9, 10], "cpu")[1] < 0


def test_perplexity_by_length_and_cli(tmp_path, capsys):
    cfg = get_config("debug", vocab_size=128)
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (100, 60, 90)]
    rows = perplexity_by_length(model, docs, [16, 64], max_windows=3, device="cpu")
    stream = torch.tensor([t for d in docs for t in d])
    with torch.no_grad():
        want = sum(F.cross_entropy(model(stream[None, w * 64:w * 64 + 64])[0],
                                   stream[w * 64 + 1:w * 64 + 65], reduction="sum") for w in range(3))
    assert rows[1]["windows"] == 3 and rows[1]["tokens"] == 192
    assert rows[1]["perplexity"] == pytest.approx(math.exp(want.item() / 192), rel=1e-5)
    save_checkpoint(tmp_path / "ckpt", 1, model, None, {"consumed_samples": 0, "model_config": cfg.to_dict()})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"input_ids": d}) for d in docs))
    assert eval_main(["ppl-length", "--checkpoint", str(tmp_path / "ckpt"), "--data",
                      str(tmp_path / "d.jsonl"), "--lengths", "16", "64", "--max-windows", "3",
                      "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ppl_length"][1]["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-5)
    assert (tmp_path / "o" / "ppl_length.png").stat().st_size > 1000


def test_passkey_marks_chance_and_warns_beyond_the_trained_positions(tmp_path, caplog):
    """A debug model trained for 64 positions, asked at 48 and 96 tokens: one warning naming 96, the
    chance level in the result, the table and on the heat map's colour bar, a line before 96."""
    from megaqwen.eval_long import KEYS, passkey_figure, passkey_table, run_passkey, trained_positions

    cfg = get_config("debug", max_position_embeddings=64, num_layers=1)
    model = build_model(cfg, seed=0).eval()
    with caplog.at_level(logging.WARNING, logger="megaqwen.eval"):
        result = run_passkey(model, tmp_path, [48, 96], [0.5], 1, "cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "passkey lengths [96] exceed the 64 positions" in warnings[0]
    assert result["beyond_trained"] == [96] and result["trained_positions"] == 64
    # " NNNNN" is 6 tokens (space + one per digit): ln(1/90000) / 6
    assert result["chance"] == {"accuracy": 1 / 90_000, "mean_logprob": pytest.approx(-math.log(90_000) / 6)}
    assert len(KEYS) == 90_000 and "1 in 90,000 keys" in passkey_table(result)
    fig = passkey_figure(result)
    bar_ax = fig.axes[1]
    assert any(tuple(line.get_ydata()) == (1 / 90_000, 1 / 90_000) for line in bar_ax.get_lines())
    assert [tuple(line.get_xdata()) for line in fig.axes[0].get_lines()] == [(0.5, 0.5)]  # before column 1
    assert (tmp_path / "passkey.png").stat().st_size > 1000
    yarn = get_config("debug", rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_position=32)
    assert trained_positions(yarn)[0] == 32 and "stretches RoPE to 128" in trained_positions(yarn)[1]
