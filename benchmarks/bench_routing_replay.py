"""How far an MoE policy's routing drifts between its rollout and its updates: what grpo.routing_replay
corrects. A GRPO run of the debug MoE model (Qwen2-MoE, 8 experts top-2, 2 sparse layers) on the shipped
arithmetic prompts with grpo.routing_replay=true and several updates per rollout; every forward that
replays (the old log-probs, then each update) is watched: the share of (token, sparse layer) choices
where the current router's own top-k differs from the rollout's experts, i.e. the tokens that would have
gone to other experts without the replay. The first forwards of a rollout run on the rollout's own
weights, so their share must be 0 (a check of the recording); it grows with each update.

    python benchmarks/bench_routing_replay.py [--rollouts 4] [--updates 4] [--lr 1e-3]

The watch wraps `SparseMoeBlock.route` in this script only (a measurement, not a product path).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import megaqwen.train.main  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from megaqwen.models.config import get_config
from megaqwen.models.qwen2_moe.model import SparseMoeBlock
from megaqwen.train.loop import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--updates", type=int, default=4, help="grpo.updates_per_rollout")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--rows", type=int, default=32, help="train.global_batch_size (one micro-batch per step)")
    args = p.parse_args()
    torch.set_num_threads(2)

    calls: list[list[int]] = []  # per replaying forward: [changed choices, replayed choices]
    model_cfg = get_config("debug-moe")
    first_sparse = min(i for i in range(model_cfg.num_layers) if model_cfg.is_sparse_layer(i))
    route = SparseMoeBlock.route

    def watched(self, x_NH):
        out = route(self, x_NH)
        replay = self.routing_replay
        if replay is not None:  # a replaying forward (activation recomputation is off: counted once)
            own = torch.topk(out[0].probs_NE, self.top_k, dim=-1).indices.sort(-1).values
            rep = replay.to(own.device, torch.long)
            fed = (rep >= 0).all(-1)
            changed = (own != rep.sort(-1).values).any(-1) & fed
            if self.layer_index == first_sparse:  # a new forward starts at the first sparse layer
                calls.append([0, 0])
            calls[-1][0] += int(changed.sum())
            calls[-1][1] += int(fed.sum())
        return out

    SparseMoeBlock.route = watched
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_module("megaqwen.conf", version_base="1.3"):
            cfg = OmegaConf.to_object(compose("config", overrides=[
                "model=debug-moe", "train.device=cpu", "logger.wandb.enabled=false",
                f"train.out_dir={tmp}/run", "train.objective=grpo", "rollout.prompts=arithmetic",
                "grpo.routing_replay=true",
                f"grpo.updates_per_rollout={args.updates}", f"grpo.group_size={args.group_size}",
                "grpo.max_new_tokens=3", "train.seq_len=24", f"train.global_batch_size={args.rows}",
                f"train.micro_batch_size={args.rows}", f"train.steps={args.rollouts * args.updates}",
                f"train.lr={args.lr}", "train.schedule=constant", "train.warmup_steps=0",
                "train.save_every=0", f"train.log_every={args.updates}", "grpo.rewards=[{name:math}]"]))
        t0 = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t0
    per_rollout = 2 * args.updates  # old log-probs of each step's micro-batch, then each update's forward
    if len(calls) != args.rollouts * per_rollout:
        raise SystemExit(f"expected {args.rollouts * per_rollout} replaying forwards, saw {len(calls)}")
    print(f"\ndebug-moe GRPO, {args.rows} rows per step, {args.updates} updates per rollout, lr {args.lr}; "
          f"share of (token, sparse layer) choices the current router would route elsewhere ({wall:.0f} s)\n")
    print("| rollout | old log-probs | " + " | ".join(f"update {u + 1}" for u in range(args.updates)) + " |")
    print("|---|---|" + "---|" * args.updates)
    for r in range(args.rollouts):
        chunk = calls[r * per_rollout:(r + 1) * per_rollout]
        old, upd = chunk[:args.updates], chunk[args.updates:]  # old log-probs first, then the updates
        old_share = sum(c for c, _ in old) / max(sum(n for _, n in old), 1)
        print(f"| {r + 1} | {old_share:.2%} | " + " | ".join(f"{c / max(n, 1):.2%}" for c, n in upd) + " |")


if __name__ == "__main__":
    main()
