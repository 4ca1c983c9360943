"""`train.objective=dpo` (megaqwen/train/objectives.py): the per-pair losses against hand computation,
ln 2 while the policy is the reference, the trainer's logged loss with train.lr=0 against the
published formula computed independently with transformers on the policy A and the reference B, and
layouts (pp2 x cp2, tp2 x FSDP dp2) through the real launcher against one process."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.config import ParallelConfig
from megaqwen.tokenizer import EOD_ID
from megaqwen.train.config import Config, DataConfig, TrainConfig
from megaqwen.train.metric_names import unregistered
from megaqwen.train.objectives import DPO_METRICS, DPOConfig, dpo_losses, objective_for
from tests.parallel.test_launch import launch, shard, single_process  # noqa: F401  (fixture)
from tests.parallel.trainer_harness import build_run, layout_config, run_steps

VOCAB, T = 512, 20


def pair_batch(pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """(2 pairs, T) rows 2i chosen / 2i+1 rejected: one prompt per pair, two responses of their own
    lengths, padding after; labels -100 except on the response tokens (next-token, shifted)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(2 * pairs, T, dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    for i in range(pairs):
        n_prompt = int(torch.randint(2, 7, (), generator=g))
        prompt = torch.randint(4, VOCAB, (n_prompt,), generator=g)
        for row in (2 * i, 2 * i + 1):
            n_resp = int(torch.randint(2, T - n_prompt + 1, (), generator=g))
            seq = torch.cat([prompt, torch.randint(4, VOCAB, (n_resp,), generator=g)])
            tokens[row, :len(seq)] = seq
            labels[row, n_prompt - 1:len(seq) - 1] = seq[n_prompt:]
    positions = torch.arange(T).expand_as(tokens).contiguous()
    return {"tokens": tokens, "labels": labels, "position_ids": positions,
            "document_ids": torch.zeros_like(tokens)}


def _cfg(**dpo) -> Config:
    return Config(train=TrainConfig(objective="dpo"), dpo=DPOConfig(**dpo))


def test_dpo_losses_by_hand():
    pw, pl, rw, rl = (torch.tensor([-3.0, -8.0]), torch.tensor([-5.0, -4.0]),
                      torch.tensor([-4.0, -6.0]), torch.tensor([-4.5, -5.0]))
    delta = [(-3 + 5) - (-4 + 4.5), (-8 + 4) - (-6 + 5)]  # 1.5, -3
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    got = dpo_losses(pw, pl, rw, rl, DPOConfig(beta=0.5))
    assert got.tolist() == pytest.approx([-math.log(sig(0.5 * d)) for d in delta])
    got = dpo_losses(pw, pl, rw, rl, DPOConfig(beta=0.5, label_smoothing=0.2))
    assert got.tolist() == pytest.approx([-0.8 * math.log(sig(0.5 * d)) - 0.2 * math.log(sig(-0.5 * d))
                                          for d in delta])
    got = dpo_losses(pw, pl, rw, rl, DPOConfig(beta=0.5, loss="ipo"))
    assert got.tolist() == pytest.approx([(d - 1.0) ** 2 for d in delta])


def _model_and_h(batch):
    cfg = get_config("debug", vocab_size=VOCAB)
    model = get_spec(cfg).build(cfg, seed=0)
    return model, model.hidden_states(batch["tokens"], batch["position_ids"])


def test_loss_is_ln2_while_the_policy_is_the_reference():
    batch = pair_batch(3, seed=0)
    model, h = _model_and_h(batch)
    ref = model.token_logprobs(h, batch["labels"]).detach()
    for dpo in ({}, {"label_smoothing": 0.1}):
        parts = objective_for(_cfg(**dpo))(model, h, {**batch, "reference_logprobs": ref, "cp_group": None})
        assert parts.count.item() == 3
        assert (parts.sum / parts.count).item() == pytest.approx(math.log(2), rel=1e-6)
        assert parts.metrics["dpo/margin"].item() == pytest.approx(0.0, abs=1e-6)
        assert set(parts.metrics) == set(DPO_METRICS)


def test_ipo_averages_log_probabilities_over_response_tokens():
    batch = pair_batch(2, seed=1)
    model, h = _model_and_h(batch)
    policy = model.token_logprobs(h, batch["labels"]).detach()
    ref = policy * 0.5  # any reference: the loss is a function of the rows' averages
    parts = objective_for(_cfg(beta=0.2, loss="ipo"))(model, h, {**batch, "reference_logprobs": ref,
                                                                  "cp_group": None})
    n = (batch["labels"] != IGNORE_INDEX).sum(1)
    avg_p, avg_r = policy.sum(1) / n, ref.sum(1) / n
    delta = (avg_p[0::2] - avg_p[1::2]) - (avg_r[0::2] - avg_r[1::2])
    assert parts.sum.item() == pytest.approx(((delta - 1 / 0.4) ** 2).sum().item(), rel=1e-5)


def test_config_refuses_odd_micro_batches_and_bad_settings():
    with pytest.raises(ValueError, match="train.objective=dpo: a micro-batch of 1 row is odd"):
        Config(train=TrainConfig(objective="dpo", micro_batch_size=1, global_batch_size=4)).validate()
    with pytest.raises(ValueError, match="dpo.beta must be positive"):
        _cfg(beta=0.0).validate()
    with pytest.raises(ValueError, match="dpo.loss='hinge'"):
        _cfg(loss="hinge").validate()
    with pytest.raises(ValueError, match="validation of train.objective=dpo is not supported"):
        Config(train=TrainConfig(objective="dpo", eval_every=10),
               data=DataConfig(valid_fraction=0.1)).validate()
    Config(train=TrainConfig(objective="lm", micro_batch_size=1, global_batch_size=4)).validate()


# ---------------------------------------------------------------------------------------------
# the trainer's step against transformers


def _hf_folder(path: Path, seed: int, vocab: int = VOCAB) -> Path:
    """A random Qwen2 HF folder of the debug architecture, saved by transformers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megaqwen.models.qwen2.hf_adapter import config_to_hf
    from tests.hf_random import randomise_

    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(Qwen2Config(**config_to_hf(get_config("debug", vocab_size=vocab), torch.float32)))
    randomise_(hf, mlp_std=0.1, std=0.1)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def policy_and_reference(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dpo_models")
    return _hf_folder(root / "A", seed=1), _hf_folder(root / "B", seed=2)


def _hf_row_logps(folder: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) sum over the response tokens of log p(label), transformers' own model of `folder`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(batch["tokens"], position_ids=batch["position_ids"]).logits.float()
    labels = batch["labels"]
    lp = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (lp * (labels != IGNORE_INDEX)).sum(1)


def _dpo_run(init_from: Path, reference_from: Path | None, **dpo):
    model_cfg = get_config("debug", vocab_size=VOCAB)
    cfg = layout_config(model_cfg, ParallelConfig(), steps=2, global_batch=4, micro_batch=2, seq_len=T,
                        lr=0.0, seed=0)
    cfg = replace(cfg, train=replace(cfg.train, objective="dpo", init_from=str(init_from),
                                     reference_from=str(reference_from) if reference_from else None),
                  dpo=DPOConfig(**dpo))
    cfg.validate()
    return build_run(cfg)


def test_trainer_loss_with_lr0_equals_the_formula_with_transformers(policy_and_reference):
    """train.lr=0, policy A (init_from), reference B (reference_from): each step's logged loss and
    metrics equal -log sigmoid(beta delta) (DPO eq. 7) from transformers' log-probabilities."""
    a, b = policy_and_reference
    beta = 0.5
    batches = [pair_batch(2, seed=10), pair_batch(2, seed=11)]
    metrics = run_steps(_dpo_run(a, b, beta=beta), batches)
    for m, batch in zip(metrics, batches, strict=True):
        pa, pb = _hf_row_logps(a, batch), _hf_row_logps(b, batch)
        delta = (pa[0::2] - pa[1::2]) - (pb[0::2] - pb[1::2])
        want = -F.logsigmoid(beta * delta).mean().item()
        print(f"logged {m['loss']:.8f} formula {want:.8f} |diff| {abs(m['loss'] - want):.2e}")
        assert abs(m["loss"] - want) <= 1e-5
        assert m["dpo/loss"] == pytest.approx(m["loss"], rel=1e-6)
        assert m["dpo/margin"] == pytest.approx((beta * delta).mean().item(), abs=1e-5)
        assert m["dpo/rewards_chosen"] == pytest.approx(beta * (pa[0::2] - pb[0::2]).mean().item(), abs=1e-5)
        assert m["dpo/logps_rejected"] == pytest.approx(pa[1::2].mean().item(), abs=1e-4)
        assert m["dpo/accuracy"] == pytest.approx((delta > 0).float().mean().item())
    assert unregistered(metrics[0]) == []


def test_trainer_loss_is_ln2_at_step_0_with_the_initial_weights_as_reference(policy_and_reference):
    a, _ = policy_and_reference
    m = run_steps(_dpo_run(a, None), [pair_batch(2, seed=12)])[0]
    assert m["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert m["dpo/margin"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# layouts through the real launcher


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


FULL_VOCAB = "model.vocab_size=151936"
"""Pair rows are padded with the tokenizer's end-of-document id (151643): the model needs its vocabulary."""


@pytest.fixture(scope="module")
def pair_shard(tmp_path_factory) -> str:
    """A dpo shard as `megaqwen-data tokenize --format dpo` writes it (documents 2p chosen, 2p+1
    rejected; PREFIX.mask 1 on the response and its end token), ids < 512: 40 pairs whose prompts,
    responses and lengths differ (prompt 2-6 tokens, responses 1-8, at most seq_len + 1 = 17)."""
    from chat_shards import write_masked_shard

    g = np.random.default_rng(0)
    documents = []
    for _ in range(40):
        prompt = g.integers(4, VOCAB, int(g.integers(2, 7)))
        for _ in range(2):  # chosen, rejected
            resp = g.integers(4, VOCAB, int(g.integers(1, 9)))
            mask = [0] * len(prompt) + [1] * (len(resp) + 1)  # the response and its end token
            documents.append((np.concatenate([prompt, resp, [EOD_ID]]), mask))
    return write_masked_shard(tmp_path_factory.mktemp("pairs") / "prefs", "dpo", documents)


@pytest.fixture(scope="module")
def dpo_one(tmp_path_factory, shard, pair_shard) -> tuple[str, tuple[str, ...], list[dict]]:  # noqa: F811
    """One process through the trainer: a pretraining run (the initial weights), then DPO on the pair
    shard from them, reference = those weights online. (pair shard, the DPO run's overrides, its
    metrics rows), shared by the tests below."""
    base = tmp_path_factory.mktemp("dpo_one")
    single_process(base / "init", shard, FULL_VOCAB)
    common = (FULL_VOCAB, "train.objective=dpo", f"train.init_from={base / 'init'}",
              "train.micro_batch_size=2", "dpo.beta=0.5")
    single_process(base / "one", pair_shard, *common)
    return pair_shard, common, _rows(base / "one")


@pytest.mark.slow
def test_dpo_on_a_pair_shard_through_the_trainer(tmp_path, dpo_one):
    """The trainer's own data path: pair rows from a dpo shard, reference = the initial weights:
    step 1 is ln 2 with margin 0; then the policy has moved off the reference (the pairs are random
    tokens: which way the next pairs' margins go says nothing)."""
    pair_shard, common, rows = dpo_one
    # dpo.precompute_reference: the same log-probabilities, computed before the first step
    single_process(tmp_path / "pre", pair_shard, *common, "dpo.precompute_reference=true")
    keys = ("loss", "grad_norm", *DPO_METRICS)
    assert [[r[k] for k in keys] for r in _rows(tmp_path / "pre")] == [[r[k] for k in keys] for r in rows]
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert rows[0]["dpo/margin"] == 0 and abs(rows[-1]["dpo/margin"]) > 1e-3
    assert all(0 <= r["dpo/accuracy"] <= 1 and r["dpo/loss"] == pytest.approx(r["loss"]) for r in rows)
    assert unregistered({k for r in rows for k in r}) == []


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [("parallel.tp=2", "train.engine=deepspeed", "parallel.zero_stage=2"),
                                    ("parallel.pp=2", "parallel.cp=2", "dpo.precompute_reference=true")],
                         ids=["tp2-deepspeed-zero2-dp2", "pp2-cp2-precomputed"])
def test_dpo_under_layouts_equals_one_process(tmp_path, dpo_one, layout):
    """Pair rows of a dpo shard (padded: the padding is a second document), reference = the initial
    weights: step 1 is ln 2, and every step's loss and dpo/* metrics under tp2 x DeepSpeed ZeRO-2 dp2
    (pairs over dp ranks, reference online) and pp2 x cp2 (row sums over cp shards, loss on the last
    stage, the reference precomputed there by dpo.precompute_reference) equal one process with the
    reference online. A reference model under tp2 x FSDP dp2 and pp2 x cp2 online is test_objective.py's
    test_reference_objective_under_layouts_equals_one_process."""
    pair_shard, common, one = dpo_one
    run = launch(tmp_path / "lay", pair_shard, *common, *layout, nproc=4)
    assert run.returncode == 0, run.stderr[-4000:]
    lay = _rows(tmp_path / "lay")
    assert one[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert one[-1]["dpo/margin"] > 1e-4  # the policy moved away from the reference
    assert unregistered({k for r in one for k in r}) == []
    for got, want in zip(lay, one, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        for k in DPO_METRICS:
            # rewards and margin are differences of log-prob sums of ~-100 (16 tokens): fp32
            # reduction order after Adam steps moves them ~1e-5 absolute; a wrong cp/pp sum is ~1
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=5e-5), (got["step"], k)


@pytest.mark.slow
def test_logged_loss_on_a_pair_shard_equals_the_formula_with_transformers(tmp_path, pair_shard):
    """The whole trainer (data, reference, step, logger) with train.lr=0, policy A = train.init_from
    and reference B = train.reference_from (HF folders of different seeds): each logged loss equals
    -log sigmoid(beta delta) (DPO eq. 7), mean over the step's pairs, with delta from transformers'
    log-probabilities of the same rows (the trainer's own data stream, replayed)."""
    import megaqwen.train.main  # noqa: F401  (registers the schema)
    from megaqwen.parallel import setup as par
    from megaqwen.train.loop import build_batches
    from megaqwen.train.preflight import compose_config

    a, b = _hf_folder(tmp_path / "A", seed=1, vocab=151936), _hf_folder(tmp_path / "B", seed=2, vocab=151936)
    beta = 0.5
    single_process(tmp_path / "run", pair_shard, FULL_VOCAB, "train.objective=dpo",
                   "train.micro_batch_size=2", f"train.init_from={a}", f"train.reference_from={b}",
                   "train.lr=0", "train.min_lr=0", f"dpo.beta={beta}", "train.save_every=0")
    logged = [r["loss"] for r in _rows(tmp_path / "run")]
    from tests.parallel.test_launch import COMMON

    cfg = compose_config([f"train.out_dir={tmp_path / 'run'}", f"data.path={pair_shard}", *COMMON, FULL_VOCAB,
                          "train.objective=dpo", "train.micro_batch_size=2", "train.device=cpu"])
    env = par.init_distributed(cfg.parallel, "cpu")
    micro = build_batches(cfg, env, 0, steps_left=cfg.train.steps)
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    for step, loss in enumerate(logged):
        rows = [next(micro) for _ in range(accum)]
        batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        pa, pb = _hf_row_logps(a, batch), _hf_row_logps(b, batch)
        delta = (pa[0::2] - pa[1::2]) - (pb[0::2] - pb[1::2])
        want = -F.logsigmoid(beta * delta).mean().item()
        print(f"step {step + 1}: logged {loss:.8f} formula {want:.8f} |diff| {abs(loss - want):.2e}")
        assert abs(loss - want) <= 1e-5
