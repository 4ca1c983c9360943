"""`train.objective=grpo` under layouts, through the trainer's own builders and `train_step`
(tests/parallel/trainer_harness.py), against one process in plain PyTorch (full logits, log_softmax,
the published per-response / per-token formulas): the first step's loss, grpo/* metrics and gradients,
for per-response aggregation split across cp ranks (row sums all-reduced), pp x cp, tp x SP x dp with
accumulation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megaqwen.kernels.cross_entropy import IGNORE_INDEX as X
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.train.grpo import GRPOConfig

from .parallel_harness import gather_full, spawn
from .trainer_harness import build_run, capture_grads, layout_config, run_steps

LAYERS, T, GLOBAL_B, LR, SEED, PROMPT = 4, 16, 8, 3e-3, 1234, 4


def _cfg():
    return replace(get_config("debug"), vocab_size=1024, num_layers=LAYERS)


def _batch(cfg) -> dict[str, torch.Tensor]:
    """GLOBAL_B responses of uneven lengths after a PROMPT-token prompt, right-padded; per-token
    advantages; old log-probs = the initial policy's moved by up to +-0.4 nats (both clips act)."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, cfg.vocab_size, (GLOBAL_B, T), generator=g)
    labels = torch.full((GLOBAL_B, T), X)
    for i, n in enumerate(torch.randint(PROMPT + 2, T + 1, (GLOBAL_B,), generator=g).tolist()):
        tokens[i, n:] = 0
        labels[i, PROMPT - 1:n - 1] = tokens[i, PROMPT:n]
    adv = torch.randn(GLOBAL_B, generator=g)[:, None].expand(GLOBAL_B, T).contiguous()
    pos = torch.arange(T).expand(GLOBAL_B, T).contiguous()
    with torch.no_grad():
        lp = _logprobs(get_spec(cfg).build(cfg, seed=SEED), tokens, labels, pos)
    old = lp + (torch.rand(GLOBAL_B, T, generator=g) - 0.5) * 0.8
    return {"tokens": tokens, "labels": labels, "position_ids": pos, "document_ids": torch.zeros_like(tokens),
            "advantages": adv, "old_logprobs": torch.where(labels != X, old, 0.0)}


def _logprobs(model, tokens, labels, pos):
    lp = torch.log_softmax(model.logits(model.hidden_states(tokens, pos)).float(), -1)
    return torch.where(labels != X, lp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)


def _reference(cfg, g: GRPOConfig) -> dict:
    """One process, plain PyTorch: the loss of the published formulas and its gradients."""
    model = get_spec(cfg).build(cfg, seed=SEED)
    b = _batch(cfg)
    valid = b["labels"] != X
    lp = _logprobs(model, b["tokens"], b["labels"], b["position_ids"])
    ratio = torch.exp(lp - b["old_logprobs"])
    a = b["advantages"]
    j = torch.minimum(ratio * a, ratio.clamp(1 - g.clip_low, 1 + g.clip_high) * a) * valid
    n = valid.sum(1)
    if g.loss_agg == "token":
        loss = -j.sum() / n.sum()
    elif g.loss_agg == "sequence":
        loss = -(j.sum(1) / n).mean()
    else:
        loss = -(j.sum(1) / g.max_new_tokens).mean()
    loss.backward()
    clip_low = ((a < 0) & (ratio < 1 - g.clip_low) & valid).float()
    per_row = g.loss_agg != "token"
    mean = (lambda x: ((x * valid).sum(1) / n).mean()) if per_row else (lambda x: (x * valid).sum() / n.sum())
    return {"loss": loss.item(), "grpo/clip_low": mean(clip_low).item(),
            "grpo/ratio": mean(ratio.detach()).item(), "grpo/nll": mean(-lp.detach()).item(),
            "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}


def _worker(rank, world, cases):
    from megaqwen.parallel.config import ParallelConfig

    cfg = _cfg()
    out = {}
    for name, lay, grpo in cases:
        ref = _reference(cfg, grpo)
        pcfg = ParallelConfig(tp=lay.get("tp", 1), pp=lay.get("pp", 1), cp=lay.get("cp", 1), cp_tile=4,
                              sequence_parallel=lay.get("sp", False), pp_schedule="1f1b")
        run_cfg = layout_config(cfg, pcfg, 1, GLOBAL_B, lay.get("micro", 2), T, LR, SEED)
        # grpo after layout_config's validate(): its rollout.* checks (prompts; pp / cp need
        # rollout.engine=vllm) are the loop's; train_step's objective_for still checks grpo.*
        run_cfg = replace(run_cfg, train=replace(run_cfg.train, objective="grpo"), grpo=grpo)
        run = build_run(run_cfg)
        seen = capture_grads(run, gather_full)
        (metrics,) = run_steps(run, [_batch(cfg)])
        err = torch.tensor(max(((gr - ref["grads"][k]).abs().max() / ref["grads"][k].abs().max()).item()
                               for k, gr in seen["grads"].items()))
        torch.distributed.all_reduce(err, op=torch.distributed.ReduceOp.MAX)
        keys = ("loss", "grpo/clip_low", "grpo/ratio", "grpo/nll")
        out[name] = {"grad_err": err.item(), "metric_err": {k: abs(metrics[k] - ref[k]) for k in keys},
                     "clip_low": ref["grpo/clip_low"]}
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_grpo_layouts_equal_one_process():
    """World 4: cp=2 x dp=2 and pp=2 x cp=2 with per-response (sequence) aggregation, whose row sums
    span the cp shards; tp=2 with SP x dp=2, 1-row micro-batches (accumulation) with the constant
    (Dr. GRPO) one. First step: loss and metrics to 1e-6 (absolute: the loss is a small difference of
    advantages), gradients to 1e-5 of their largest."""
    off = {"old_logprobs": "rollout"}  # the batch's old log-probs are read (not on-policy)
    cases = [("cp2-dp2-sequence", {"cp": 2}, GRPOConfig(loss_agg="sequence", clip_high=0.28, **off)),
             ("pp2-cp2-sequence", {"pp": 2, "cp": 2}, GRPOConfig(loss_agg="sequence", **off)),
             ("tp2-sp-dp2-mb1-constant", {"tp": 2, "sp": True, "micro": 1},
              GRPOConfig(loss_agg="constant", max_new_tokens=T, **off))]
    results = spawn(_worker, 4, cases)
    for n, r in results.items():
        print(n, r)
    assert all(r["clip_low"] > 0 for r in results.values())  # the clipped branch is exercised
    bad = {n: r for n, r in results.items()
           if not (max(r["metric_err"].values()) <= 1e-6 and r["grad_err"] <= 1e-5)}
    assert not bad, results
