"""Reward scoring and the GRPO objective's cost (issue 23).

1. Reward components (megaqwen/rewards), samples per second on fixed completions:
   math    answer extraction + equivalence (a mix: plain numbers, fractions, tuples, and expressions
           that reach sympy)
   format  the `think_answer` regex
   code    a correct and a wrong program with 3 asserts each, in the sandbox (one child process per
           check), --workers at a time
   rm      a random debug-shaped score-head model (2 layers, hidden 64, the 152K vocabulary): chat
           rendering + tokenising + forward, 8 samples per forward
2. The objective: forward + backward of a `small` model (4 layers, hidden 256, vocabulary 32K) on
   B x T rows with train.objective=lm vs grpo (token; sequence with a KL term): the GRPO surrogate
   reads the same chunked cross-entropy (`token_logprobs`), so its extra cost is a few elementwise ops.
Each time is the best of --repeat runs (the objectives' runs interleaved).

    python benchmarks/bench_rewards.py [--threads 2] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.rewards.combine import Rewards
from megaqwen.rewards.sample import Sample
from megaqwen.rewards.spec import RewardSpec
from megaqwen.train.grpo import GRPOConfig, grpo_objective
from megaqwen.train.objective import LM, REFERENCE_FIELD


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def math_samples(n: int) -> list[Sample]:
    cases = [("so \\boxed{42}", "42"), ("the answer is \\frac{3}{4}.", "0.75"), ("\\boxed{(1, 2)}", "(1,2)"),
             ("we get \\boxed{x^2+2x+1}", "(x+1)^2"), ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("7 apples", "8")]
    return [Sample({"prompt": "q", "answer": a}, c) for c, a in (cases[i % len(cases)] for i in range(n))]


def code_samples(n: int) -> list[Sample]:
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    return [Sample({"prompt": "q", "tests": tests}, good if i % 2 else bad) for i in range(n)]


def rm_folder(root: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from megaqwen.models.qwen2.hf_adapter import config_to_hf

    cfg = dataclasses.replace(get_config("debug"), head="score", tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen2ForSequenceClassification(Qwen2Config(**config_to_hf(cfg, torch.float32)))
    hf.save_pretrained(root / "rm")
    return root / "rm"


def reward_rows(args) -> list[tuple[str, int, float]]:
    rows = []
    s = math_samples(600)
    rewards = Rewards.build([RewardSpec("math")])
    rows.append(("math", len(s), best(lambda: rewards(s), args.repeat)))
    s = [Sample({"prompt": "q"}, "<think>" + "x" * 400 + "</think> <answer>5</answer>")] * 2000
    rewards = Rewards.build([RewardSpec("format", pattern="think_answer")])
    rows.append(("format", len(s), best(lambda: rewards(s), args.repeat)))
    s = code_samples(16)
    for w in sorted({1, args.workers}):
        code = Rewards.build([RewardSpec("code", workers=w, timeout_s=10.0)])
        rows.append((f"code (workers={w})", len(s), best(lambda code=code: code(s), args.repeat)))
    with tempfile.TemporaryDirectory() as d:
        rm = Rewards.build([RewardSpec("rm", path=str(rm_folder(Path(d))), device="cpu", batch_size=8)])
        s = [Sample({"prompt": f"Question {i}: what is {i} + {i}?"}, f"It is {2 * i}. " * 8)
             for i in range(64)]
        rm(s[:8])  # warm-up
        rows.append(("rm (debug model)", len(s), best(lambda: rm(s), args.repeat)))
    return rows


def objective_rows(args) -> list[tuple[str, float]]:
    debug = get_config("debug")
    cfg = dataclasses.replace(debug, name="small", hidden_size=256, intermediate_size=704, num_layers=4,
                              num_heads=8, num_kv_heads=2, vocab_size=32768)
    model = get_spec(cfg).build(cfg, seed=0)
    b, t = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, t // 4:-1] = tokens[:, t // 4 + 1:]
    pos = torch.arange(t).expand(b, t)
    with torch.no_grad():
        lp = model.token_logprobs(model.hidden_states(tokens, pos), labels)
    batch = {"tokens": tokens, "labels": labels, "advantages": torch.randn(b, generator=g),
             "old_logprobs": lp + 0.01, REFERENCE_FIELD: lp - 0.01, "cp_group": None}
    objectives = [("lm (cross-entropy)", LM),
                  ("grpo token", grpo_objective(GRPOConfig())),
                  ("grpo sequence + k3 KL, off-policy",
                   grpo_objective(GRPOConfig(loss_agg="sequence", kl_coef=0.04, updates_per_rollout=2)))]
    steps = []
    for _, obj in objectives:
        def step(obj=obj):
            model.zero_grad(set_to_none=True)
            parts = model(tokens, position_ids=pos, objective=obj, batch=batch).parts
            (parts.sum / obj.units(batch)).backward()

        step()  # warm-up
        steps.append(step)
    times = [[] for _ in steps]
    for _ in range(args.repeat):  # interleaved: a load change on a shared machine hits all alike
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t0)
    return [(name, min(ts)) for (name, _), ts in zip(objectives, times, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| reward component | samples | seconds | samples/s |")
    print("|---|---:|---:|---:|")
    for name, n, s in reward_rows(args):
        print(f"| {name} | {n} | {s:.3f} | {n / s:,.0f} |")
    print()
    print(f"| objective (small model, B={args.batch}, T={args.seq}, fwd+bwd) | seconds | vs lm |")
    print("|---|---:|---:|")
    rows = objective_rows(args)
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {s / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
