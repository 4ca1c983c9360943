"""The reward curve of an online RL run (`train.objective=grpo`) as a PNG: mean reward per step with
a band of +- one standard deviation over the step's rollout rows and its moving average, the
fixed-set evaluation (rollout.eval_every: sampled and greedy reward, at the step whose policy it
measured), the accuracy of the verifiable
prompts and each reward component, and the response length; stage starts marked as in loss.png.

    python -m megaqwen.train.rollout_plot runs/grpo        # writes runs/grpo/reward.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SMOOTH = 5
"""Steps in the rollout reward's moving average (each step's mean depends on the prompts it drew)."""


def reward_rows(out_dir: str | Path) -> dict[int, dict]:
    """step -> the metrics row, for the steps that logged rollout/reward_mean (the last row of a step
    that a resumed run rewrote)."""
    rows: dict[int, dict] = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "rollout/reward_mean" in row:
            rows[row["step"]] = row
    return rows


def plot_rewards(out_dir: str | Path, path: str | Path | None = None, title: str | None = None) -> Path:
    """Write the reward curve (default out_dir/reward.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megaqwen.train.plot import stage_starts

    out_dir = Path(out_dir)
    rows = reward_rows(out_dir)
    if not rows:
        raise ValueError(f"{out_dir / 'metrics.jsonl'} has no rollout/reward_mean rows (not a grpo run?)")
    steps = sorted(rows)
    mean = [rows[s]["rollout/reward_mean"] for s in steps]
    std = [rows[s].get("rollout/reward_std", 0.0) for s in steps]
    fig, (ax, ax_len) = plt.subplots(2, 1, figsize=(9.5, 5), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(steps, mean, lw=1.0, color="tab:blue", alpha=0.6, label="rollout reward (mean)")
    if len(steps) >= 2 * SMOOTH:
        smooth = [sum(mean[max(0, i - SMOOTH + 1):i + 1]) / len(mean[max(0, i - SMOOTH + 1):i + 1])
                  for i in range(len(mean))]
        ax.plot(steps, smooth, lw=2.2, color="tab:blue", label=f"rollout reward ({SMOOTH}-step mean)")
    for k, style in (("rollout/eval_reward", "o-"), ("rollout/eval_greedy_reward", "s:")):
        have = [s for s in steps if k in rows[s]]
        if have:  # evaluated before the step's update: the policy after step - 1
            ax.plot([s - 1 for s in have], [rows[s][k] for s in have], style, color="black", lw=1.6, ms=4,
                    label=f"fixed set: {k.removeprefix('rollout/eval_').replace('_', ' ')}")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color="tab:blue", alpha=0.15, label="+- 1 std over rows")
    extra = sorted({k for s in steps for k in rows[s] if k.startswith("rollout/reward/")})
    series = (["rollout/accuracy"] if any("rollout/accuracy" in rows[s] for s in steps) else []) + extra
    for k in series:
        have = [s for s in steps if k in rows[s]]
        if len(extra) == 1 and k in extra:
            continue  # the total reward itself
        if k == "rollout/accuracy" and "rollout/reward/math" in extra:
            continue  # the same numbers as the maths component
        ax.plot(have, [rows[s][k] for s in have], lw=1.0, ls="--", label=k.removeprefix("rollout/"))
    for first, label in stage_starts(out_dir):
        if steps[0] <= first <= steps[-1]:
            ax.axvline(first - 0.5, color="grey", ls="--", lw=1)
            ax.text(first - 0.5, 0.98, f" {label}", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="dimgrey")
    ax.set_ylabel("reward")
    ax.set_title(title or f"{out_dir.name}: reward over {len(steps)} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not over them
    ax_len.plot(steps, [rows[s].get("rollout/response_length", float("nan")) for s in steps],
                color="tab:orange", lw=1.2)
    ax_len.set_ylabel("response tokens")
    ax_len.set_xlabel("step")
    ax_len.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path) if path is not None else out_dir / "reward.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(plot_rewards(sys.argv[1]))
