"""`train.objective=reward` (megaqwen/train/reward.py): the Bradley–Terry loss and its metrics against a
hand computation, the token that scores a row, the errors (layouts: tests/parallel/test_reward_layouts.py)."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megaqwen.kernels.cross_entropy import IGNORE_INDEX as X
from megaqwen.models.config import get_config
from megaqwen.train.metric_names import unregistered
from megaqwen.train.objective import get_objective
from megaqwen.train.reward import REWARD, scoring_mask


class _Scores:
    """A stand-in model whose per-token score is h[..., 0]: the rewards are numbers we chose."""

    cfg = SimpleNamespace(pad_token_id=0)

    def scores(self, h):
        return h[..., 0]


def test_bradley_terry_loss_and_metrics_equal_a_hand_computation():
    # 2 pairs, T = 5, pad 0. A row's reward is the score of its last non-pad token:
    # row 0 -> token 3 (1.5), row 1 -> token 2 (-0.5), row 2 (no pad) -> token 4 (0.25), row 3 -> 1 (2.0)
    tokens = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 0, 0], [5, 6, 7, 8, 9], [5, 6, 0, 0, 0]])
    labels = torch.where(tokens > 6, tokens, X)  # not read: the scoring token comes from the pads
    h = torch.full((4, 5, 1), 9.0)  # every other token: a decoy that must not be scored
    h[0, 3], h[1, 2], h[2, 4], h[3, 1] = 1.5, -0.5, 0.25, 2.0
    h.requires_grad_()
    parts = REWARD(_Scores(), h, {"tokens": tokens, "labels": labels, "cp_group": None})
    d1, d2 = 1.5 - (-0.5), 0.25 - 2.0
    want = -math.log(1 / (1 + math.exp(-d1))) - math.log(1 / (1 + math.exp(-d2)))
    assert parts.sum.item() == pytest.approx(want, rel=1e-6)
    assert parts.count.item() == 2  # units: pairs
    m = {k: v.item() for k, v in parts.metrics.items()}
    assert m == pytest.approx({"reward/accuracy": 1.0, "reward/margin": d1 + d2,
                               "reward/chosen": 1.5 + 0.25, "reward/rejected": -0.5 + 2.0})
    parts.sum.backward()  # d/dr_c = -σ(-d) on the scoring token only
    g = h.grad[..., 0]
    assert g[0, 3].item() == pytest.approx(-1 / (1 + math.exp(d1)), rel=1e-6)
    assert g[3, 1].item() == pytest.approx(1 / (1 + math.exp(d2)), rel=1e-6)
    assert torch.count_nonzero(g) == 4
    assert unregistered(set(m)) == []


def test_scoring_token_and_odd_batches():
    """HF's rule: the last token that is not the pad (an inner pad does not end the row); a row of
    pads only is scored at its first token."""
    tokens = torch.tensor([[0, 0, 0, 0], [5, 0, 5, 0], [5, 5, 5, 5]])
    at = scoring_mask(tokens, pad_id=0)
    assert at.int().argmax(1).tolist() == [0, 2, 3] and at.sum().item() == 3
    with pytest.raises(ValueError, match="of 3 rows is odd"):
        REWARD(_Scores(), torch.zeros(3, 4, 1), {"tokens": tokens, "cp_group": None})
    assert get_objective("reward") is REWARD


def test_lm_objective_on_a_score_head_names_the_problem():
    from megaqwen.models.spec import get_spec

    cfg = replace(get_config("debug"), vocab_size=64, head="score", tie_word_embeddings=False)
    model = get_spec(cfg).build(cfg, seed=0)
    h = torch.zeros(1, 3, cfg.hidden_size)
    with pytest.raises(RuntimeError, match="has no LM head"):
        model.loss(h, torch.zeros(1, 3, dtype=torch.long))
    lm = get_spec(get_config("debug")).build(get_config("debug"), device="meta")
    with pytest.raises(RuntimeError, match="model.head=score"):
        lm.scores(h)


# ---------------------------------------------------------------------------------------------
# the trainer's step against transformers' sequence classifier

VOCAB, T = 512, 16


def _pairs(n_pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded rows (pad 0) of uneven lengths, labels on the response after a 4-token prompt."""
    g = torch.Generator().manual_seed(seed)
    b = 2 * n_pairs
    tokens = torch.randint(1, VOCAB, (b, T), generator=g)
    labels = torch.full((b, T), X)
    for i, n in enumerate(torch.randint(6, T + 1, (b,), generator=g).tolist()):
        tokens[i, n:] = 0
        labels[i, 3:n - 1] = tokens[i, 4:n]
    return {"tokens": tokens, "labels": labels, "document_ids": torch.zeros_like(tokens),
            "position_ids": torch.arange(T).expand(b, T).contiguous()}


def test_trainer_step_with_lr0_equals_bradley_terry_on_transformers_rewards(tmp_path):
    """A random `Qwen2ForSequenceClassification` saved by transformers is the run's train.init_from
    (HF import of a score head); with train.lr=0 every step's logged loss and reward/* metrics equal
    -log σ(r_chosen - r_rejected) from transformers' own pooled logits (last non-pad token)."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from megaqwen.models.qwen2.hf_adapter import config_to_hf
    from megaqwen.parallel.config import ParallelConfig
    from tests.hf_random import randomise_
    from tests.parallel.trainer_harness import build_run, layout_config, run_steps

    model_cfg = replace(get_config("debug"), vocab_size=VOCAB, head="score", tie_word_embeddings=False,
                        pad_token_id=0)
    torch.manual_seed(1)
    hf = Qwen2ForSequenceClassification(Qwen2Config(**config_to_hf(model_cfg, torch.float32)))
    assert hf.config.pad_token_id == 0
    randomise_(hf, mlp_std=0.1, std=0.1).save_pretrained(tmp_path / "rm")
    cfg = layout_config(model_cfg, ParallelConfig(), steps=2, global_batch=4, micro_batch=2, seq_len=T,
                        lr=0.0, seed=0, objective="reward")
    cfg = replace(cfg, train=replace(cfg.train, init_from=str(tmp_path / "rm")))
    cfg.validate()
    batches = [_pairs(2, seed=10), _pairs(2, seed=11)]
    metrics = run_steps(build_run(cfg), batches)
    hf.eval()
    for m, batch in zip(metrics, batches, strict=True):
        with torch.no_grad():
            r = hf(batch["tokens"]).logits[:, 0]
        margin = r[0::2] - r[1::2]
        want = -F.logsigmoid(margin).mean().item()
        print(f"logged {m['loss']:.8f} transformers {want:.8f} |diff| {abs(m['loss'] - want):.2e}")
        assert abs(m["loss"] - want) <= 1e-5
        assert m["reward/margin"] == pytest.approx(margin.mean().item(), abs=1e-5)
        assert m["reward/chosen"] == pytest.approx(r[0::2].mean().item(), abs=1e-5)
        assert m["reward/rejected"] == pytest.approx(r[1::2].mean().item(), abs=1e-5)
        assert m["reward/accuracy"] == pytest.approx((margin > 0).float().mean().item())
    assert margin.abs().min() > 1e-3  # rewards that differ: a wrong scoring token would show
    assert unregistered(metrics[0]) == []


def test_dpo_shard_rows_are_scored_at_their_last_input_token():
    """A dpo shard's row (megaqwen.data.pairs: the document without its final EOD, padded with EOD)
    is scored at its last real token: for ChatML the `\\n` after `<|im_end|>`, what HF pools when
    it scores `apply_chat_template` output."""
    import numpy as np

    from megaqwen.data.pairs import row_features

    eod, im_end, nl = 151643, 151645, 198
    doc = np.array([1, 2, 3, 100, 101, im_end, nl, eod])
    mask = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    row = row_features(doc, mask, seq_len=12, eod_id=eod)
    at = scoring_mask(row["tokens"][None], pad_id=eod)
    assert at[0].nonzero().flatten().tolist() == [6] and row["tokens"][6] == nl


@pytest.mark.slow
def test_reward_model_on_the_toy_preferences_end_to_end(tmp_path):
    """train() on the shipped toy preference pairs (a dpo shard) with model.head=score and
    train.objective=reward: the pairs reach the objective intact, the Bradley–Terry loss falls, and
    validation reports the held-out pairs' accuracy (val_reward/accuracy), every key registered."""
    import json

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import megaqwen.train.main  # noqa: F401  (registers the schema in Hydra's ConfigStore)
    from megaqwen.data.chat import tokenize_chat
    from megaqwen.data.tokenize import shipped_sample_corpus
    from megaqwen.train.data_check import check_run_shards
    from megaqwen.train.loop import train

    tokenize_chat([str(shipped_sample_corpus().parent / "preferences.jsonl")], str(tmp_path / "prefs"), "dpo")
    overrides = [f"train.out_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'prefs'}", "model=debug",
                 "model.head=score", "model.tie_word_embeddings=false", "train.objective=reward",
                 "train.seq_len=48", "train.global_batch_size=8", "train.micro_batch_size=4",
                 "train.steps=40", "train.save_every=0", "train.warmup_steps=2", "train.lr=1e-2",
                 "train.eval_every=20", "train.eval_iters=2", "data.valid_fraction=0.1",
                 "logger.wandb.enabled=false", "train.device=cpu"]
    with initialize_config_module("megaqwen.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    cfg.validate()
    check_run_shards(cfg)
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    acc = [r["reward/accuracy"] for r in rows if "reward/accuracy" in r]
    val = [(r["val_loss"], r["val_reward/accuracy"]) for r in rows if "val_loss" in r]
    print("loss first/last 10", sum(loss[:10]) / 10, sum(loss[-10:]) / 10, "train accuracy first/last 10",
          sum(acc[:10]) / 10, sum(acc[-10:]) / 10, "held-out (loss, accuracy)", val)
    assert len(loss) == 40 and sum(loss[-10:]) < sum(loss[:10])
    assert len(val) == 2 and all(0.0 <= a <= 1.0 for _, a in val)
    assert unregistered({k for r in rows for k in r}) == []


def test_config_pairs_the_score_head_with_the_reward_objective():
    from megaqwen.train.config import Config, TrainConfig

    score = replace(get_config("debug"), head="score", tie_word_embeddings=False)
    reward, lm = (TrainConfig(objective=o, micro_batch_size=2, global_batch_size=4) for o in ("reward", "lm"))
    Config(model=score, train=reward).validate()
    with pytest.raises(ValueError, match="set model.head=score and model.tie_word_embeddings=false"):
        Config(train=reward).validate()
    with pytest.raises(ValueError, match="no LM head for train.objective=lm"):
        Config(model=score, train=lm).validate()
    user = replace(lm, objective="megaqwen.train.objective:LM")  # by import path: the user's choice
    Config(model=score, train=user).validate()
    with pytest.raises(ValueError, match="train.objective=reward: a micro-batch of 1 row is odd"):
        Config(model=score, train=replace(reward, micro_batch_size=1, global_batch_size=2)).validate()
