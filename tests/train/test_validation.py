"""Validation loss on held-out documents or a shard, the held-out split itself, and profiler traces."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megaqwen.data.blend import build_dataset
from megaqwen.data.holdout import split_documents
from megaqwen.data.indexed import IndexedDataset
from megaqwen.train.loop import train
from megaqwen.train.validation import evaluate


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_held_out_split_is_disjoint_stable_and_seed_free(shard):
    ix = IndexedDataset(shard)
    held, kept = split_documents(ix, 0.1, held_out=True), split_documents(ix, 0.1, held_out=False)
    assert len(held) + len(kept) == len(ix) and not set(held.ids) & set(kept.ids)
    assert 5 <= len(held) <= 40  # ~10% of 200 documents
    assert held.num_tokens == int(ix.sizes[held.ids].sum())
    assert np.array_equal(held.get(3), ix.get(int(held.ids[3])))
    assert np.array_equal(split_documents(ix, 0.1, held_out=True).ids, held.ids)  # no dependence on seeds
    # training samples are made only of training documents
    train_ds = build_dataset(shard, seq_len=32, num_samples=20, seed=1,
                             documents=lambda x: split_documents(x, 0.1, held_out=False))
    stream = np.concatenate([ix.get(int(i)) for i in kept.ids])
    window = train_ds.window(0)
    assert any(np.array_equal(stream[j:j + 8], window[:8]) for j in range(len(stream) - 8))
    with pytest.raises(ValueError, match="holds out none"):
        split_documents(ix, 1e-6, held_out=True)


class Bigram(torch.nn.Module):
    """Mean or (sum, count) next-token loss of a bigram table: enough to check the reductions."""

    def __init__(self, vocab: int, parts: bool):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)
        self.parts = parts

    def forward(self, tokens, labels):
        loss = torch.nn.functional.cross_entropy(self.table(tokens).flatten(0, 1), labels.flatten(),
                                                 reduction="sum", ignore_index=-100)
        count = (labels != -100).sum()
        return (loss, count) if self.parts else loss / count


def test_evaluate_weights_by_tokens_for_mean_and_sum_count_losses():
    torch.manual_seed(0)
    batches = [{"tokens": torch.randint(0, 11, (2, 7)), "labels": torch.randint(0, 11, (2, 7))}
               for _ in range(3)]
    batches[1]["labels"][:, :5] = -100  # uneven token counts: a plain mean of means would be wrong
    mean_model, parts_model = Bigram(11, parts=False), Bigram(11, parts=True)
    parts_model.load_state_dict(mean_model.state_dict())
    loss_fn = lambda m, b: m(b["tokens"], b["labels"])  # noqa: E731
    a = evaluate(mean_model, iter(batches), 3, loss_fn)
    b = evaluate(parts_model, iter(batches), 3, loss_fn)
    with torch.no_grad():
        total = sum(float(parts_model(x["tokens"], x["labels"])[0]) for x in batches)
    assert a["val_tokens"] == b["val_tokens"] == 14 + 4 + 14
    assert a["val_loss"] == pytest.approx(total / 32, rel=1e-6) and b["val_loss"] == pytest.approx(total / 32)
    assert mean_model.training  # back in training mode afterwards


def test_validation_loss_is_logged_plotted_and_repeatable(tmp_path, shard, make_config):
    cfg = make_config(tmp_path, shard, "train.steps=5", "train.eval_every=2", "train.eval_iters=2",
                      "data.valid_fraction=0.1", "train.lr=3e-3")
    train(cfg)
    r = rows(tmp_path)
    assert [x["step"] for x in r if "val_loss" in x] == [2, 4, 5]  # every 2 steps and the last
    assert all(math.isfinite(x["val_loss"]) and x["val_tokens"] == 2 * 4 * 32 for x in r if "val_loss" in x)
    assert r[-1]["val_loss"] < r[1]["val_loss"]
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    # a shard given as data.valid_path is read the same way
    other = tmp_path / "valid_shard"
    train(make_config(other, shard, "train.steps=2", "train.eval_every=2", f"data.valid_path={shard}"))
    assert "val_loss" in rows(other)[-1]


def test_profiler_traces_the_chosen_steps(tmp_path, shard, make_config):
    train(make_config(tmp_path, shard, "train.steps=3", "train.save_every=0", "profile.start_step=2",
                      "profile.num_steps=1"))
    folder = tmp_path / "profile" / "steps_2-2"
    trace = json.loads((folder / "rank0.trace.json").read_text())
    assert trace["traceEvents"]
    assert "aten::" in (folder / "rank0.ops.txt").read_text()
    assert not (folder / "rank0.memory.pickle").exists()  # CUDA only
