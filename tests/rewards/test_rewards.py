"""megaqwen/rewards: the maths, format and code components on fixed samples, a reward model's score of
prompt + completion against transformers' `Qwen2ForSequenceClassification` on the chat-template
rendering, the weighted combination (several reward models included) and the config refusals."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from megaqwen.models.config import get_config
from megaqwen.rewards.combine import Rewards
from megaqwen.rewards.rules import format_reward, math_reward
from megaqwen.rewards.sample import Sample
from megaqwen.rewards.spec import RewardSpec, check_specs


def _s(completion: str, **record) -> Sample:
    return Sample(record={"prompt": "q", **record}, completion=completion)


def test_math_reward_checks_the_final_answer_against_the_record():
    samples = [_s("so it is \\boxed{\\frac{1}{2}}", answer="0.5"),
               _s("The answer is 42.", answer=42),
               _s("I think 7, no wait, 8", answer="8"),
               _s("\\boxed{(1, 2)}", answer="(1,2)"),
               _s("\\boxed{3}", answer="4"),
               _s("no number at all", answer="4"),
               _s("\\boxed{5}", tests="assert True")]  # a code record: maths does not apply
    assert math_reward(samples) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, None]


def test_format_reward_presets_and_regex():
    texts = ["<think>a</think> <answer>5</answer>", "<answer>5</answer>", "so \\boxed{5}.", "5"]
    samples = [_s(t) for t in texts]
    assert format_reward(samples, "boxed") == [0.0, 0.0, 1.0, 0.0]
    assert format_reward(samples, "answer_tag") == [1.0, 1.0, 0.0, 0.0]
    assert format_reward(samples, "think_answer") == [1.0, 0.0, 0.0, 0.0]
    assert format_reward(samples, r"^\d+$") == [0.0, 0.0, 0.0, 1.0]


def test_code_reward_runs_the_tests_in_the_sandbox():
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    samples = [_s("Here:\n```python\ndef add(a, b):\n    return a + b\n```", tests=tests),
               _s("```python\ndef add(a, b):\n    return a - b\n```", tests="\n".join(tests)),
               _s("\\boxed{2}", answer="2")]
    out = Rewards.build([RewardSpec("code", timeout_s=10.0, workers=2)])(samples[:2]).components["code"]
    assert out.tolist() == [1.0, 0.0]
    from megaqwen.rewards.code import code_reward

    assert code_reward(samples, timeout_s=10.0)[2] is None
    with pytest.raises(ValueError, match="sample 1: a record's 'tests' must be a string or a list"):
        code_reward([samples[2], _s("x", tests=3)])


def test_weighted_combination_and_what_applies():
    rewards = Rewards.build([RewardSpec("math", 1.0), RewardSpec("format", 0.25, pattern="boxed"),
                             RewardSpec("format", -0.5, label="long", pattern=r".{40,}")])
    samples = [_s("\\boxed{4}", answer="4"), _s("it is 5", answer="4"),
               _s("x" * 45 + " \\boxed{4}", answer="4"), _s("\\boxed{1}", tests="assert True")]
    out = rewards(samples)
    assert out.total.tolist() == pytest.approx([1.25, 0.0, 1.25 - 0.5, 0.25])
    assert out.components["math"][:3].tolist() == [1.0, 0.0, 1.0] and math.isnan(out.components["math"][3])
    means = out.means()
    assert means["math"] == pytest.approx(2 / 3) and means["format"] == 0.75 and means["long"] == 0.25
    assert means["total"] == pytest.approx((1.25 + 0.75 + 0.25) / 4)
    with pytest.raises(ValueError, match="no reward component .*math.* applies to sample 0"):
        Rewards.build([RewardSpec("math")])([_s("\\boxed{1}", tests="assert True")])


def test_user_reward_function_by_import_path():
    rewards = Rewards.build([RewardSpec("tests.rewards.test_rewards:length_reward", 2.0, label="len")])
    out = rewards([Sample({"prompt": "q"}, "abc", [1, 2, 3]), Sample({"prompt": "q"}, "a", [9])])
    assert out.total.tolist() == [6.0, 2.0] and out.components["len"].tolist() == [3.0, 1.0]


def length_reward(samples: list[Sample]) -> list[float]:
    return [float(len(s.token_ids)) for s in samples]


def test_specs_are_checked_with_the_entry_named():
    for specs, match in [([], "rewards is empty"),
                         ([RewardSpec("maths")], r"rewards\[0\].name=.maths. is not one of"),
                         ([RewardSpec("math"), RewardSpec("math", 0.5)], r"rewards\[1\]: two components"),
                         ([RewardSpec("rm")], "name=rm needs path"),
                         ([RewardSpec("format", pattern="(")], "is not a regular expression")]:
        with pytest.raises(ValueError, match=match):
            check_specs(specs)
    with pytest.raises(ValueError, match="cannot import it"):
        Rewards.build([RewardSpec("tests.rewards.nowhere:fn")])
    # what `megaqwen-train --help` prints: the override's spelling, defaults left out
    assert str(RewardSpec("rm", 0.5, path="runs/rm")) == "{name: rm, weight: 0.5, path: runs/rm}"


# ---------------------------------------------------------------------------------------------
# reward models


def _hf_reward_model(folder, seed: int):
    """A random `Qwen2ForSequenceClassification` of the debug shape (full Qwen vocabulary, so the
    shipped tokenizer's chat template renders into it), saved by transformers (no tokenizer files:
    the shipped one is used)."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from megaqwen.models.qwen2.hf_adapter import config_to_hf
    from tests.hf_random import randomise_

    cfg = replace(get_config("debug"), head="score", tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = Qwen2ForSequenceClassification(Qwen2Config(**config_to_hf(cfg, torch.float32)))
    randomise_(hf)
    hf.save_pretrained(folder)
    return hf.eval()


SAMPLES = [Sample({"prompt": "What is 2 + 3?", "answer": "5"}, "2 + 3 = \\boxed{5}"),
           Sample({"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Name a colour."}]}, "Blue."),
           Sample({"prompt": "Write a long answer."}, "A long answer, " * 12)]


def _hf_scores(hf, samples: list[Sample]) -> list[float]:
    """transformers' pooled logit of each sample's chat-template rendering (prompt turns + the
    completion as the assistant turn, tokenised by apply_chat_template), one unpadded row at a time."""
    from megaqwen.data.chat import chat_tokenizer

    tok, _ = chat_tokenizer(None)  # the shipped tokenizer (what the reward model uses), cached
    out = []
    with torch.no_grad():
        for s in samples:
            ids = tok.apply_chat_template(s.messages() + [{"role": "assistant", "content": s.completion}],
                                          tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            out.append(hf(torch.tensor([ids])).logits[0, 0].item())
    return out


def test_reward_models_score_as_transformers_and_combine_with_weights(tmp_path):
    """Two reward models (own labels and weights) and a rule. Each model's reward of a sample equals
    transformers' `Qwen2ForSequenceClassification` of the same folder on the rendering, to 1e-5
    (batched: 2 right-padded rows per forward); total = sum of weight x value."""
    want_a = _hf_scores(_hf_reward_model(tmp_path / "a", seed=1), SAMPLES)
    want_b = _hf_scores(_hf_reward_model(tmp_path / "b", seed=2), SAMPLES)
    assert max(want_a) - min(want_a) > 1e-3  # the samples' rewards differ: a wrong token would show
    specs = [RewardSpec("rm", 0.5, label="helpful", path=str(tmp_path / "a"), device="cpu", batch_size=2),
             RewardSpec("rm", -2.0, label="harmful", path=str(tmp_path / "b"), device="cpu"),
             RewardSpec("format", 0.1, pattern="boxed")]
    out = Rewards.build(specs)(SAMPLES)
    assert out.components["helpful"].tolist() == pytest.approx(want_a, abs=1e-5)
    assert out.components["harmful"].tolist() == pytest.approx(want_b, abs=1e-5)
    fmt = [1.0, 0.0, 0.0]
    assert out.total.tolist() == pytest.approx(
        [0.5 * x - 2.0 * y + 0.1 * f for x, y, f in zip(want_a, want_b, fmt)], abs=1e-4)


def test_a_language_model_is_refused_as_reward_model(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megaqwen.models.qwen2.hf_adapter import config_to_hf
    from megaqwen.rewards.reward_model import RewardModel

    Qwen2ForCausalLM(Qwen2Config(**config_to_hf(get_config("debug"), torch.float32))).save_pretrained(
        tmp_path / "lm")
    with pytest.raises(ValueError, match="head=lm model has no score head"):
        RewardModel.load(tmp_path / "lm", device="cpu")
