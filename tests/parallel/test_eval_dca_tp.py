"""Evaluation with Dual Chunk Attention under tp=2 (gloo) equals one process: `build_for_eval` with a
mesh loads each rank's slices; the per-document loss (unpacked windows) and a packed batch's loss
(document ids, positions restarting per document) match the single-process model; `megaqwen-eval
loss` run on two ranks (as under torchrun) prints the single-process loss."""

from __future__ import annotations

import pytest
import torch
from parallel_harness import spawn

from megaqwen.eval import build_for_eval, document_loss, long_context_config
from megaqwen.models import build_model
from megaqwen.models.config import get_config
from megaqwen.parallel.dims import ParallelDims

pytestmark = pytest.mark.distributed


def _setup():
    cfg = long_context_config(get_config("debug", vocab_size=256), dca=(16, 4), dca_original=12)
    weights = build_model(cfg, seed=3).state_dict()
    for name, w in weights.items():  # bigger q/k so that positions move the logits
        if "q_proj.weight" in name or "k_proj.weight" in name:
            w.mul_(20)
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (61, 30, 45)]
    tokens = torch.tensor([docs[0] + docs[1][:3], docs[1] + docs[2][:34]])  # (2, 64)
    pos = torch.tensor([list(range(61)) + list(range(3)), list(range(30)) + list(range(34))])
    doc_ids = torch.tensor([[0] * 61 + [1] * 3, [0] * 30 + [1] * 34])
    return cfg, weights, docs, (tokens, pos, doc_ids)


def _losses(model, docs, packed) -> tuple[float, int, float]:
    total, count = document_loss(model, docs, 40, torch.device("cpu"))  # 61 tokens: windows 40 + 20
    tokens, pos, doc_ids = packed
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], 1)
    labels[doc_ids != torch.cat([doc_ids[:, 1:], doc_ids[:, -1:]], 1)] = -100  # no label across docs
    with torch.no_grad():
        parts = model(tokens, labels=labels, position_ids=pos, document_ids=doc_ids)
    return total, count, parts.sum.item()


def eval_worker(rank: int, world: int) -> tuple[float, int, float]:
    torch.set_num_threads(1)
    cfg, weights, docs, packed = _setup()
    mesh = ParallelDims(world_size=world, tp=world).build_mesh("cpu")
    model = build_for_eval(cfg, weights, "cpu", mesh=mesh)
    assert model.model.layers["0"].self_attn.q_proj.weight.shape[0] == cfg.num_heads * cfg.head_dim_ // world
    return _losses(model, docs, packed)


def test_dca_eval_under_tp2_equals_one_process():
    cfg, weights, docs, packed = _setup()
    want = _losses(build_for_eval(cfg, weights, "cpu"), docs, packed)
    plain = _losses(build_for_eval(cfg, weights, "cpu", attention="plain"), docs, packed)
    assert abs(plain[0] - want[0]) > 1e-3  # DCA changes these losses (past c = 16)
    got = spawn(eval_worker, 2)
    assert got[1] == want[1]
    assert abs(got[0] - want[0]) <= 1e-4 * abs(want[0]) and abs(got[2] - want[2]) <= 1e-4 * abs(want[2])


def cli_worker(rank: int, world: int, argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    torch.set_num_threads(1)
    from megaqwen.eval import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def test_megaqwen_eval_cli_under_two_ranks_equals_one_process(tmp_path, capsys):
    import dataclasses
    import json

    from megaqwen.eval import main
    from megaqwen.train.checkpoint import save_checkpoint

    cfg, weights, docs, _ = _setup()
    model = build_model(dataclasses.replace(cfg, dca_chunk_size=0, dca_local_size=0,
                                            dca_original_max_position=0), seed=0)
    model.load_state_dict(weights)
    save_checkpoint(tmp_path / "ckpt", 1, model, None, {"consumed_samples": 0, "model_config": cfg.to_dict()})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"input_ids": d}) for d in docs))
    argv = ["loss", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "d.jsonl"),
            "--max-len", "40", "--device", "cpu"]
    assert main(argv) == 0
    want = json.loads(capsys.readouterr().out)
    rc, out = spawn(cli_worker, 2, argv)
    got = json.loads(out)
    assert rc == 0 and got["tokens"] == want["tokens"] and abs(got["loss"] - want["loss"]) <= 1e-5
