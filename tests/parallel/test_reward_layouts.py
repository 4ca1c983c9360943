"""Reward-model training (`train.objective=reward`, `model.head=score`) under layouts, through the
trainer's own builders and `train_step` (tests/parallel/trainer_harness.py), against one process in
plain PyTorch: tp x SP x dp, pp x cp, cp x tp, FSDP2 (see the test), validation included."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megaqwen.kernels.cross_entropy import IGNORE_INDEX as X
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.train.config import TrainConfig

from .parallel_harness import gather_full, spawn
from .trainer_harness import build_run, capture_grads, layout_config, reference_adamw, run_steps

LAYERS, T, STEPS, GLOBAL_B, MBS, LR, SEED = 4, 16, 3, 8, 2, 3e-3, 1234


def _cfg():
    return replace(get_config("debug"), vocab_size=1024, num_layers=LAYERS, head="score",
                   tie_word_embeddings=False, pad_token_id=0)


def _batches(cfg) -> list[dict[str, torch.Tensor]]:
    """STEPS + 1 global batches of GLOBAL_B right-padded rows (pad 0) of uneven lengths; labels on a
    response after a 5-token prompt. Rows 2i, 2i + 1 are a pair."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS + 1):  # the last: held out (validation)
        tokens = torch.randint(1, cfg.vocab_size, (GLOBAL_B, T), generator=g)
        labels = torch.full((GLOBAL_B, T), X)
        for i, n in enumerate(torch.randint(7, T + 1, (GLOBAL_B,), generator=g).tolist()):
            tokens[i, n:] = 0
            labels[i, 4:n - 1] = tokens[i, 5:n]
        out.append({"tokens": tokens, "labels": labels, "document_ids": torch.zeros_like(tokens),
                    "position_ids": torch.arange(T).expand(GLOBAL_B, T).contiguous()})
    return out


def _step_metrics(model, b) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean -logσ(margin) over the pairs, metrics) of one plain-PyTorch forward: rewards picked by
    index (each row's last non-pad token)."""
    h = model.hidden_states(b["tokens"], b["position_ids"])
    idx = [max(i for i in range(T) if tok[i] != 0) for tok in b["tokens"].tolist()]  # last non-pad
    r = model.scores(h)[torch.arange(GLOBAL_B), torch.tensor(idx)]
    margin = r[0::2] - r[1::2]
    loss = -F.logsigmoid(margin).mean()
    return loss, {"loss": loss.item(), "reward/margin": margin.mean().item(),
                  "reward/chosen": r[0::2].mean().item(), "reward/rejected": r[1::2].mean().item(),
                  "reward/accuracy": (margin > 0).float().mean().item()}


def _reference(cfg) -> dict:
    """One process, plain PyTorch: STEPS AdamW steps, then the held-out batch evaluated."""
    model = get_spec(cfg).build(cfg, seed=SEED)
    opt = reference_adamw(model, TrainConfig(lr=LR))
    rows, grads = [], {}
    *train, held_out = _batches(cfg)
    for s, b in enumerate(train):
        loss, row = _step_metrics(model, b)
        loss.backward()
        if s == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        rows.append(row)
    with torch.no_grad():
        val = _step_metrics(model, held_out)[1]
    return {"rows": rows, "grads": grads, "val": val}


def _worker(rank, world, cases):
    from megaqwen.parallel.config import ParallelConfig

    cfg = _cfg()
    ref = _reference(cfg)
    out = {}
    for name, lay in cases:
        pcfg = ParallelConfig(tp=lay.get("tp", 1), pp=lay.get("pp", 1), cp=lay.get("cp", 1), cp_tile=4,
                              sequence_parallel=lay.get("sp", False), dp_mode=lay.get("mode", "ddp"),
                              pp_schedule="1f1b")
        run_cfg = layout_config(cfg, pcfg, STEPS, GLOBAL_B, MBS, T, LR, SEED, objective="reward")
        run = build_run(run_cfg)
        seen = capture_grads(run, gather_full)
        *train, held_out = _batches(cfg)
        metrics = run_steps(run, train)
        val = _validate(run, held_out)
        # loss relative; rewards (~0.1 at init, margins ~1e-3) absolute
        err_of = {k: tuple(abs(got[k] - want[k]) / (abs(want[k]) if k == "loss" else 1.0)
                         for got, want in zip(metrics, ref["rows"], strict=True)) for k in ref["rows"][0]}
        err = torch.tensor(max(((g - ref["grads"][n]).abs().max() / ref["grads"][n].abs().max()).item()
                               for n, g in seen["grads"].items()))
        torch.distributed.all_reduce(err, op=torch.distributed.ReduceOp.MAX)
        val_err = max(abs(val[f"val_{k}" if k != "loss" else "val_loss"] - v) for k, v in ref["val"].items())
        out[name] = {"metric_err": err_of, "grad_err": err.item(), "val_err": val_err,
                     "losses": [m["loss"] for m in metrics]}
    return out


def _validate(run, batch) -> dict[str, float]:
    """The trainer's validation of one held-out global batch: `evaluate` with the loop's eval
    function (the pipeline's `eval_parts`, or `validation_parts`) and the validator's dp group."""
    from megaqwen.train.forward import model_inputs, validation_parts
    from megaqwen.train.objectives import objective_for
    from megaqwen.train.validation import evaluate

    from .trainer_harness import micro_batches

    cfg, env, pipe = run.cfg, run.env, run.pipe
    fn = ((lambda m, b: pipe.eval_parts(model_inputs(b, cfg, env.device), objective_for(cfg),
                                        cfg.data.document_mask))
          if pipe is not None else (lambda m, b: validation_parts(m, b, cfg, env)))
    dp_group = env.mesh.dp_group if env.mesh is not None and env.dp_size > 1 else None
    n = GLOBAL_B // (MBS * env.dp_size)
    return evaluate(run.model, micro_batches([batch], cfg, env), n, fn, dp_group)


@pytest.mark.distributed
@pytest.mark.slow
def test_reward_layouts_equal_one_process():
    """World 4: tp=2 with SP x dp=2 (DDP), pp=2 x cp=2 and cp=2 x tp=2 (the scoring token on one cp
    shard), FSDP2 dp=4 (the (1, H) score weight sharded over 4 ranks: three hold no rows).
    Step 1 (no update yet): loss and reward metrics to 1e-6, gradients to 1e-5 of their largest.
    Steps 2-3 to 1e-3: AdamW's first updates are ~lr x sign(grad), so fp32 rounding flips the update
    of near-zero gradient elements; in one process, only cutting the same batch into 4 micro-batches
    already moves the step-3 loss by 1e-5 (the layouts: 3e-5 tp x SP x dp, 1e-4 pp x cp). The held-out
    batch through the trainer's validation (val_loss, val_reward/*) after the steps: to 1e-3 too."""
    cases = [("tp2-sp-dp2", {"tp": 2, "sp": True}), ("pp2-cp2", {"pp": 2, "cp": 2}),
             ("cp2-tp2", {"cp": 2, "tp": 2}), ("fsdp-dp4", {"mode": "fsdp"})]
    results = spawn(_worker, 4, cases)
    for n, r in results.items():
        print(n, "grad", r["grad_err"], "val", r["val_err"], {k: max(e) for k, e in r["metric_err"].items()})
    bad = {n: r for n, r in results.items()
           if not (max(e[0] for e in r["metric_err"].values()) <= 1e-6 and r["grad_err"] <= 1e-5
                   and max(max(e) for e in r["metric_err"].values()) <= 1e-3 and r["val_err"] <= 1e-3)}
    assert not bad, results
