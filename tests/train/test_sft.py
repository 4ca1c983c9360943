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
