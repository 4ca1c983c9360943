"""`train.objective=sft` (megaqwen/train/objectives.py): cross-entropy over the assistant tokens
only (labels -100 elsewhere), token-weighted over the step, through the objective and the trainer's
own step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.config import ParallelConfig
from megaqwen.train.config import Config, TrainConfig
from megaqwen.train.objectives import objective_for
from tests.parallel.test_launch import shard  # noqa: F401  (fixture)
from tests.parallel.trainer_harness import build_run, layout_config, run_steps

VOCAB, T = 512, 23


def chat_batch(rows: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(rows, T) conversations: a prompt (system + user), an assistant turn, a second user turn and
    a second assistant turn; labels only on the assistant turns. Also the (rows, T) assistant mask."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (rows, T + 1), generator=g)
    assistant = torch.zeros(rows, T, dtype=torch.bool)
    for r in range(rows):
        a, b, c = sorted(torch.randperm(T - 2, generator=g)[:3].add(1).tolist())
        assistant[r, a:b] = True  # first assistant turn
        assistant[r, c:] = True  # second, to the end
    labels = tokens[:, 1:].masked_fill(~assistant, IGNORE_INDEX)
    positions = torch.arange(T).expand(rows, T).contiguous()
    return ({"tokens": tokens[:, :-1].contiguous(), "labels": labels, "position_ids": positions,
             "document_ids": torch.zeros(rows, T, dtype=torch.long)}, assistant)


def _cross_entropy(model, batch, mask) -> torch.Tensor:
    with torch.no_grad():
        logits = model(batch["tokens"]).float()
    return F.cross_entropy(logits[mask], batch["labels"][mask])


def test_sft_counts_exactly_the_assistant_tokens():
    cfg = get_config("debug", vocab_size=VOCAB)
    model = get_spec(cfg).build(cfg, seed=0)
    batch, assistant = chat_batch(3, seed=0)
    sft = objective_for(Config(train=TrainConfig(objective="sft")))
    assert sft.units(batch).item() == assistant.sum().item() < assistant.numel()
    h = model.hidden_states(batch["tokens"], batch["position_ids"])
    parts = sft(model, h, {**batch, "cp_group": None})
    assert parts.count.item() == assistant.sum().item()
    assert (parts.sum / parts.count).item() == pytest.approx(_cross_entropy(model, batch, assistant).item(),
                                                              rel=1e-5)


def test_trainer_step_is_the_token_weighted_mean_over_assistant_tokens():
    """Two micro-batches with different numbers of assistant tokens: the step's loss weighs every
    assistant token once (not each micro-batch's mean equally), as one pass over the global batch."""
    cfg = layout_config(get_config("debug", vocab_size=VOCAB), ParallelConfig(), steps=1, global_batch=4,
                        micro_batch=2, seq_len=T, lr=0.0, seed=0)
    cfg = replace(cfg, train=replace(cfg.train, objective="sft"))
    cfg.validate()
    run = build_run(cfg)
    batch, assistant = chat_batch(4, seed=1)
    assert assistant[:2].sum() != assistant[2:].sum()
    want = _cross_entropy(run.plain, batch, assistant).item()
    assert run_steps(run, [batch])[0]["loss"] == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# recipes: conf/recipe/ (one run) and conf/stage/ chains


def test_recipes_compose_with_the_published_settings():
    import megaqwen.train.main  # noqa: F401  (registers the schema)
    from megaqwen.train.preflight import compose_config

    sft = compose_config(["recipe=sft-qwen2.5", "model=qwen2.5-7b", "parallel.cp=2"])
    sft.validate()
    t = sft.train
    assert (t.objective, t.seq_len, t.lr, t.min_lr, t.weight_decay, t.grad_clip) == \
        ("sft", 32768, 7e-6, 7e-7, 0.1, 1.0)
    dpo = compose_config(["recipe=dpo-qwen2.5", "model=qwen2.5-7b", "dpo.beta=0.2"])
    dpo.validate()
    assert (dpo.train.objective, dpo.train.lr, dpo.dpo.beta) == ("dpo", 7e-7, 0.2)
    assert dpo.train.micro_batch_size % 2 == 0
    assert compose_config(["model=qwen2.5-7b"]).train.objective == "lm"  # no recipe: pre-training


def test_chains_pretrain_to_sft_and_two_stage_long_sft_compose(tmp_path):
    from megaqwen.train.stages import load_chain, stage_configs

    extra = ["model=qwen2.5-7b", f"train.out_dir={tmp_path}"]
    cfgs = stage_configs(load_chain("qwen2.5-sft"), extra)
    assert [(c.train.objective, c.train.seq_len) for c in cfgs] == \
        [("lm", 4096), ("lm", 32768), ("sft", 32768)]
    assert (cfgs[-1].train.lr, cfgs[-1].train.min_lr, cfgs[-1].train.weight_decay) == (7e-6, 7e-7, 0.1)
    assert cfgs[-1].train.allow_changes == ["data.path"]  # same length and base as the 32K stage
    long = stage_configs(load_chain("qwen2.5-sft-long"), extra)
    assert [(c.train.objective, c.train.seq_len, c.model.rope_theta) for c in long] == \
        [("sft", 32768, 1e7), ("sft", 262144, 1e7)]


def test_debug_chain_pretrain_then_sft_runs(tmp_path, shard):  # noqa: F811
    """The SFT stage resumes the pre-training checkpoint and trains with train.objective=sft at its
    own lr (7e-6, cosine from the stage's first step)."""
    import json

    from megaqwen.train.stages import main

    out = tmp_path / "run"
    assert main(["debug-sft", f"train.out_dir={out}", f"data.path={shard}", "model.vocab_size=512",
                 "train.lock_timeout_min=1"]) == 0
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["done", "done"]
    assert stages[1]["resumed_from"] == stages[0]["final_checkpoint"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[4]["lr"] == pytest.approx(7e-6)


# ---------------------------------------------------------------------------------------------
# layouts through the real launcher, on an sft shard


@pytest.fixture(scope="module")
def sft_shard(tmp_path_factory) -> str:
    """An sft shard as `megaqwen-data tokenize --format sft` writes it (PREFIX.mask 1 on assistant
    tokens): 60 examples of a prompt (2-12 tokens), an answer (1-20) and the end-of-document id."""
    import numpy as np
    from chat_shards import write_masked_shard

    from megaqwen.tokenizer import EOD_ID

    g = np.random.default_rng(0)
    documents = []
    for _ in range(60):
        prompt = g.integers(4, VOCAB, int(g.integers(2, 13)))
        answer = g.integers(4, VOCAB, int(g.integers(1, 21)))
        mask = [0] * len(prompt) + [1] * len(answer) + [0]
        documents.append((np.concatenate([prompt, answer, [EOD_ID]]), mask))
    return write_masked_shard(tmp_path_factory.mktemp("sft") / "chat", "sft", documents)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [("parallel.pp=2", "parallel.cp=2")], ids=["pp2-cp2"])
def test_sft_under_layouts_equals_one_process(tmp_path, sft_shard, layout):
    """Packed SFT samples (labels only on answers, documents masked and positions reset): every
    step's loss under pp2 x cp2 (answer tokens counted over cp shards and on the last stage) equals
    one process. tp x FSDP adds nothing SFT-specific: its head and loss are the pretraining ones
    (tests/parallel), and objectives under tp2 x FSDP dp2 are test_objective.py's."""
    from tests.parallel.test_launch import launch, losses, single_process

    common = ("model.vocab_size=151936", "train.objective=sft", "train.micro_batch_size=2")
    one = single_process(tmp_path / "one", sft_shard, *common)
    run = launch(tmp_path / "lay", sft_shard, *common, *layout, nproc=4)
    assert run.returncode == 0, run.stderr[-4000:]
    assert losses(tmp_path / "lay") == pytest.approx(one, rel=1e-5)
