"""Online GRPO learns on CPU: the debug model, a short SFT on the shipped toy task (single-digit
addition, data_pipeline/samples/make_arithmetic.py), then train.objective=grpo on its prompts with the
maths verifier (exact answer, weight 1) plus a dense near-miss reward (make_arithmetic.closeness,
weight --closeness-weight) as the reward. Both are the trainer's own runs (`train(cfg)`), one after the other.

Reported:
  - the accuracy of the SFT model and of the GRPO model on the 100 distinct questions: greedy, and
    sampled as the rollouts sample (temperature 1, --eval-samples completions per question; the
    mean maths reward of such samples), with the native engine;
  - the GRPO run's reward curve (rollout/reward_mean per step, reward.png, copied to --png);
  - the time split of the GRPO steps per phase (rollout/* metrics summed over the run): generation,
    scoring, old log-probs, weight sync, training (forward/backward/optimizer).

    nice -n 10 python benchmarks/bench_grpo.py [--sft-steps 120] [--grpo-steps 24] \
        [--png benchmarks/grpo_reward.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import megaqwen.train.main  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from megaqwen.data.chat import tokenize_chat
from megaqwen.train.loop import train
from megaqwen.train.rollout_config import shipped_prompts

PHASES = ("generate_s", "score_s", "old_logprobs_s", "sync_s", "train_s")


def config(*overrides: str):
    with initialize_config_module("megaqwen.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=["model=debug", "train.device=cpu",
                                                                "logger.wandb.enabled=false",
                                                                *overrides]))


def questions() -> list[tuple[list[dict], str]]:
    return [([{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{b}="}], str(a + b))
            for a in range(10) for b in range(10)]


def accuracy(run: Path, samples: int, seed: int = 0) -> dict[str, float]:
    """Greedy and sampled (temperature 1) accuracy on the 100 questions, maths verifier."""
    from megaqwen.data.chat import chat_tokenizer
    from megaqwen.generate import SamplingParams, build_engine
    from megaqwen.generate.loading import load_model
    from megaqwen.rewards.rules import math_reward
    from megaqwen.rewards.sample import Sample
    from megaqwen.tokenizer import EOD_ID, IM_END_ID

    tok, _ = chat_tokenizer()
    engine = build_engine("native", load_model(run / "checkpoints"))
    qs = questions()
    ids = [tok.backend_tokenizer.encode(tok.apply_chat_template(m, tokenize=False,
                                                                add_generation_prompt=True),
                                        add_special_tokens=False).ids for m, _ in qs]
    out = {}
    for name, params, reps in (
            ("greedy", SamplingParams(max_new_tokens=3, greedy=True, stop_token_ids=(IM_END_ID, EOD_ID)), 1),
            ("sampled", SamplingParams(max_new_tokens=3, temperature=1.0, stop_token_ids=(IM_END_ID, EOD_ID),
                                       seed=seed), samples)):
        done = engine.generate([p for p in ids for _ in range(reps)], params)
        scored = math_reward([Sample({"answer": qs[i // reps][1]},
                                     tok.decode(c.token_ids, skip_special_tokens=True))
                              for i, c in enumerate(done)])
        out[name] = sum(scored) / len(scored)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft-steps", type=int, default=120)
    p.add_argument("--grpo-steps", type=int, default=24)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--grpo-lr", type=float, default=3e-4)
    p.add_argument("--closeness-weight", type=float, default=0.5,
                   help="weight of the dense near-miss reward beside the exact maths verifier (0: off)")
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--sft-from", default=None, help="a finished SFT run folder: skip the SFT run")
    p.add_argument("--out", default=None, help="run folders here (default: a temporary folder)")
    p.add_argument("--png", default=None, help="copy the GRPO reward curve here")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tmp = None if args.out else tempfile.TemporaryDirectory()
    root = Path(args.out or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    sft_data = root / "data" / "arithmetic_sft"
    tokenize_chat([str(shipped_prompts("arithmetic").parent / "arithmetic_sft.jsonl")], str(sft_data))

    t0 = time.perf_counter()
    sft_dir = Path(args.sft_from) if args.sft_from else root / "sft"
    if not args.sft_from:
        train(config(f"train.out_dir={sft_dir}", "train.objective=sft", f"data.path={sft_data}",
                     "train.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=16",
                     f"train.steps={args.sft_steps}", "train.lr=3e-3", "train.min_lr=3e-4",
                     "train.warmup_steps=10", "train.save_every=0",
                     f"train.log_every={max(args.sft_steps // 10, 1)}"))
    sft_s = time.perf_counter() - t0
    before = accuracy(sft_dir, args.eval_samples)
    sft_label = f"SFT run {args.sft_from}" if args.sft_from else f"SFT ({args.sft_steps} steps)"
    print(f"after {sft_label} ({sft_s:.0f} s): greedy {before['greedy']:.3f}, "
          f"sampled {before['sampled']:.3f}", flush=True)

    t0 = time.perf_counter()
    gbs = args.group_size * args.prompts_per_step
    grpo_dir = root / "grpo"
    train(config(f"train.out_dir={grpo_dir}", "train.objective=grpo", "rollout.prompts=arithmetic",
                 f"data.path={sft_data}", f"train.init_from={sft_dir / 'checkpoints'}",
                 "train.seq_len=24", "grpo.max_new_tokens=3", f"grpo.group_size={args.group_size}",
                 f"train.global_batch_size={gbs}", f"train.micro_batch_size={gbs}",
                 f"train.steps={args.grpo_steps}", f"train.lr={args.grpo_lr}", "train.schedule=constant",
                 "train.warmup_steps=0", "train.save_every=0", "rollout.save_every=5",
                 "grpo.rewards=[{name:math},{name:'megaqwen.data_pipeline.samples.make_arithmetic:closeness',"
                 f"weight:{args.closeness_weight},label:closeness}}]",
                 f"train.log_every={max(args.grpo_steps // 10, 1)}"))
    grpo_s = time.perf_counter() - t0
    after = accuracy(grpo_dir, args.eval_samples)

    rows = [json.loads(x) for x in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [r["rollout/reward_mean"] for r in rows]
    k = max(len(curve) // 5, 1)
    phases = {ph: sum(r[f"rollout/{ph}"] for r in rows) for ph in PHASES}
    total = sum(phases.values())
    result = {"sft_steps": args.sft_steps, "sft_s": sft_s, "grpo_steps": args.grpo_steps, "grpo_s": grpo_s,
              "group_size": args.group_size, "prompts_per_step": args.prompts_per_step,
              "grpo_lr": args.grpo_lr,
              "before": before, "after": after, "reward_first": sum(curve[:k]) / k,
              "reward_last": sum(curve[-k:]) / k, "reward_curve": curve, "phase_s": phases}
    print(f"\n| model | greedy accuracy | sampled accuracy (T=1, {args.eval_samples}/question) |")
    print("|---|---|---|")
    print(f"| after {sft_label} | {before['greedy']:.3f} | {before['sampled']:.3f} |")
    print(f"| after GRPO ({args.grpo_steps} steps) | {after['greedy']:.3f} | {after['sampled']:.3f} |")
    print(f"\nrollout mean reward: first {k} steps {result['reward_first']:.3f} -> last {k} steps "
          f"{result['reward_last']:.3f}")
    print("\n| phase | seconds | share |\n|---|---|---|")
    for ph, s in phases.items():
        print(f"| {ph.removesuffix('_s')} | {s:.1f} | {s / total:.1%} |")
    print(f"\nSFT {sft_s:.0f} s, GRPO {grpo_s:.0f} s (wall, including start-up and the final save)")
    if args.png:
        shutil.copy(grpo_dir / "reward.png", args.png)
        print("reward curve:", args.png)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
