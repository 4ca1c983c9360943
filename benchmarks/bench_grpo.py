"""Online GRPO learns on CPU, from one command: the debug model, a short SFT on the shipped toy task
(single-digit addition, data_pipeline/samples/make_arithmetic.py) built here (or --sft-from a finished
SFT run), then train.objective=grpo on its prompts with the maths verifier (exact answer, weight 1)
plus a dense near-miss reward (make_arithmetic.closeness, weight --closeness-weight) as the reward.
Both are the trainer's own runs (`train(cfg)`), one after the other.

Reported:
  - the fixed-set evaluation (`rollout.eval_every`, megaqwen.train.rollout.EvalSet) of the SFT model
    and of the GRPO model on the 100 distinct questions: one greedy and --eval-samples sampled
    completions per question (temperature 1, the same seed each time), accuracy and mean reward with
    standard errors (questions as the units), and the rise in standard errors;
  - the curves: the fixed-set evaluation every --eval-every steps and the rollout reward per step
    (and its moving average), reward.png copied to --png;
  - the time split of the GRPO steps per phase (rollout/* metrics summed over the run): generation,
    scoring, fixed-set evaluation, old log-probs, weight sync, training (forward/backward/optimizer).

    python benchmarks/bench_grpo.py [--sft-steps N] [--grpo-steps N] \
        [--png benchmarks/grpo_reward.png] [--json out.json] [GRPO overrides ...]

About 7 minutes on an idle 2-core CPU (SFT 350 steps ~160 s, GRPO 80 steps ~220 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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

PHASES = ("generate_s", "score_s", "eval_s", "old_logprobs_s", "sync_s", "train_s")
MAX_NEW = 3  # grpo.max_new_tokens: "17" + <|im_end|>
SEED = 0  # train.seed of both runs (the default): the fixed-set evaluation's sampling seed


def config(*overrides: str):
    with initialize_config_module("megaqwen.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=["model=debug", "train.device=cpu",
                                                                "logger.wandb.enabled=false",
                                                                *overrides]))


def evaluate(run: Path, samples: int, rewards) -> dict[str, float]:
    """The fixed-set evaluation of a checkpoint, as the GRPO loop runs it (same prompts, same seed):
    means and standard errors (questions as the units) of the greedy and sampled accuracy / reward."""
    from megaqwen.generate import build_engine
    from megaqwen.generate.loading import load_model
    from megaqwen.rewards.combine import Rewards
    from megaqwen.rewards.spec import RewardSpec
    from megaqwen.tokenizer import EOD_ID, IM_END_ID
    from megaqwen.train.rollout import EvalSet, PromptStream, eval_seed, standard_error

    engine = build_engine("native", load_model(run / "checkpoints"))
    evalset = EvalSet(PromptStream(shipped_prompts("arithmetic"), 64))
    res = evalset.run(engine, Rewards.build([RewardSpec(**r) for r in rewards]), MAX_NEW,
                      (IM_END_ID, EOD_ID), samples, seed=eval_seed(SEED))
    p = len(evalset.prompts)
    out = {"prompts": p}
    for name, values in (("greedy_accuracy", res.greedy_math), ("greedy_reward", res.greedy),
                         ("accuracy", res.sampled_math), ("reward", res.sampled)):
        v = values.view(p, -1)
        out[name], out[name + "_se"] = float(v.mean()), standard_error(v)
    return out


def rewards_spec(closeness: float) -> list[dict]:
    spec = [{"name": "math"}]
    if closeness:
        spec.append({"name": "megaqwen.data_pipeline.samples.make_arithmetic:closeness", "weight": closeness,
                     "label": "closeness"})
    return spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft-steps", type=int, default=350,
                   help="the debug model learns to condition on the question between steps ~250 and "
                        "~400 (greedy accuracy at 150 steps 0.07: the marginal; 350: 0.46; 500: 0.87)")
    p.add_argument("--sft-lr", type=float, default=1e-2)
    p.add_argument("--grpo-steps", type=int, default=80)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--grpo-lr", type=float, default=5e-4,
                   help="from the 350-step start: 3e-4 moves nothing in 30 steps, 1e-3 rises as far but "
                        "noisier, 3e-3 collapses (greedy accuracy 0.46 -> 0.15)")
    p.add_argument("--closeness-weight", type=float, default=0.5,
                   help="weight of the dense near-miss reward beside the exact maths verifier (0: off)")
    p.add_argument("--eval-every", type=int, default=10, help="fixed-set evaluation every this many steps")
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--sft-from", default=None, help="a finished SFT run folder: skip the SFT run")
    p.add_argument("--out", default=None, help="run folders here (default: a temporary folder)")
    p.add_argument("--png", default=None, help="copy the GRPO reward curve here")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*",
                   help="more overrides of the GRPO run (e.g. grpo.updates_per_rollout=2)")
    args = p.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    tmp = None if args.out else tempfile.TemporaryDirectory()
    root = Path(args.out or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    sft_data = root / "data" / "arithmetic_sft"
    tokenize_chat([str(shipped_prompts("arithmetic").parent / "arithmetic_sft.jsonl")], str(sft_data))
    rewards = rewards_spec(args.closeness_weight)

    t0 = time.perf_counter()
    sft_dir = Path(args.sft_from) if args.sft_from else root / "sft"
    if not args.sft_from:
        train(config(f"train.out_dir={sft_dir}", "train.objective=sft", f"data.path={sft_data}",
                     "train.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=16",
                     f"train.steps={args.sft_steps}", f"train.lr={args.sft_lr}",
                     f"train.min_lr={args.sft_lr / 10}",
                     "train.warmup_steps=10", "train.save_every=0", f"train.seed={SEED}",
                     f"train.log_every={max(args.sft_steps // 10, 1)}"))
    sft_s = time.perf_counter() - t0
    before = evaluate(sft_dir, args.eval_samples, rewards)
    sft_label = f"SFT run {args.sft_from}" if args.sft_from else f"SFT ({args.sft_steps} steps)"
    print(f"after {sft_label} ({sft_s:.0f} s): greedy accuracy {before['greedy_accuracy']:.3f}, "
          f"sampled {before['accuracy']:.3f}", flush=True)

    t0 = time.perf_counter()
    gbs = args.group_size * args.prompts_per_step
    grpo_dir = root / "grpo"
    spec = ",".join("{" + ",".join(f"{k}:{v!r}" if isinstance(v, str) else f"{k}:{v}"
                                   for k, v in r.items()) + "}" for r in rewards)
    train(config(f"train.out_dir={grpo_dir}", "train.objective=grpo", "rollout.prompts=arithmetic",
                 f"data.path={sft_data}", f"train.init_from={sft_dir / 'checkpoints'}",
                 "train.seq_len=24", f"grpo.max_new_tokens={MAX_NEW}", f"grpo.group_size={args.group_size}",
                 f"train.global_batch_size={gbs}", f"train.micro_batch_size={gbs}", f"train.seed={SEED}",
                 f"train.steps={args.grpo_steps}", f"train.lr={args.grpo_lr}", "train.schedule=constant",
                 "train.warmup_steps=0", "train.save_every=0", "rollout.save_every=5",
                 f"rollout.eval_every={args.eval_every}", f"rollout.eval_samples={args.eval_samples}",
                 f"grpo.rewards=[{spec}]", f"train.log_every={max(args.grpo_steps // 10, 1)}",
                 *args.overrides))
    grpo_s = time.perf_counter() - t0
    after = evaluate(grpo_dir, args.eval_samples, rewards)

    rows = [json.loads(x) for x in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/reward_mean" in r]
    curve = [r["rollout/reward_mean"] for r in rows]
    k = max(len(curve) // 5, 1)
    evals = [(r["step"] - 1, r["rollout/eval_accuracy"], r["rollout/eval_reward"],
              r["rollout/eval_greedy_accuracy"]) for r in rows if "rollout/eval_accuracy" in r] + [
                 (args.grpo_steps, after["accuracy"], after["reward"], after["greedy_accuracy"])]
    phases = {ph: sum(r.get(f"rollout/{ph}", 0.0) for r in rows) for ph in PHASES}
    total = sum(phases.values())
    rise = after["accuracy"] - before["accuracy"]
    rise_se = rise / math.hypot(before["accuracy_se"], after["accuracy_se"])
    wall = time.perf_counter() - start
    result = {"sft_steps": args.sft_steps, "sft_lr": args.sft_lr, "sft_s": sft_s,
              "grpo_steps": args.grpo_steps, "grpo_s": grpo_s, "wall_s": wall, "group_size": args.group_size,
              "prompts_per_step": args.prompts_per_step, "grpo_lr": args.grpo_lr, "before": before,
              "after": after, "accuracy_rise_in_se": rise_se, "fixed_set_curve": evals,
              "reward_first": sum(curve[:k]) / k, "reward_last": sum(curve[-k:]) / k, "reward_curve": curve,
              "phase_s": phases}
    n = before["prompts"]
    print(f"\nfixed set: the {n} distinct questions, 1 greedy + {args.eval_samples} sampled (T=1, fixed "
          "seed) completions each; +- standard error over questions\n")
    print("| model | greedy accuracy | sampled accuracy | sampled reward (math + closeness) |")
    print("|---|---|---|---|")
    for label, r in ((f"after {sft_label}", before), (f"after GRPO ({args.grpo_steps} steps)", after)):
        print(f"| {label} | {r['greedy_accuracy']:.3f} +- {r['greedy_accuracy_se']:.3f} | "
              f"{r['accuracy']:.3f} +- {r['accuracy_se']:.3f} | {r['reward']:.3f} +- {r['reward_se']:.3f} |")
    print(f"\nsampled accuracy rise: {rise:+.3f} = {rise_se:.1f} standard errors")
    print("\nfixed-set curve (policy after step s): " + ", ".join(
        f"s{s}: acc {a:.3f} / reward {rw:.3f} / greedy {g:.2f}" for s, a, rw, g in evals))
    print(f"rollout mean reward: first {k} steps {result['reward_first']:.3f} -> last {k} steps "
          f"{result['reward_last']:.3f}; per step: " + ", ".join(f"{c:.2f}" for c in curve))
    print("\n| phase | seconds | share |\n|---|---|---|")
    for ph, sec in phases.items():
        print(f"| {ph.removesuffix('_s')} | {sec:.1f} | {sec / total:.1%} |")
    print(f"\nSFT {sft_s:.0f} s, GRPO {grpo_s:.0f} s, whole command {wall:.0f} s (wall, including start-up, "
          "evaluations and saves)")
    if args.png:
        shutil.copy(grpo_dir / "reward.png", args.png)
        print("reward curve:", args.png)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
