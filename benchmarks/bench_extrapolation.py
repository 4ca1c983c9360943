"""Length extrapolation shown, not assumed: a debug-size model trained on synthetic key retrieval at
a short length, evaluated at 1x, 2x, 4x and 8x that length with plain RoPE, YaRN, DCA and YaRN+DCA.

    nice -n 10 .venv/bin/python benchmarks/bench_extrapolation.py [--steps 500] [--train-len 128]

Task (an induction/passkey task on a 64-token vocabulary): random filler tokens (ids 0-31), a needle
`KEY a b` at a relative depth (0 = start, 1 = just before the question), and at the end `KEY`; the
model must write `a b` (a, b from 16 key symbols). A trial passes when both answer tokens are the
model's argmax (greedy decoding); chance is 1/256. Training: the debug model (2 layers, hidden 64,
4 heads, head_dim 16, rope_theta 10,000) with vocab 64, loss on the two answer tokens only, at
--train-len tokens, AdamW. Evaluation (megaqwen.eval.build_for_eval, the `megaqwen-eval` path):
- rope:     plain RoPE, the trained model as is;
- yarn:     YaRN, factor 4 from the trained length (Qwen2.5's recommended static factor);
- dca:      Dual Chunk Attention as vLLM runs it, chunk_size = trained length, local_size = 1/8 of it;
- yarn+dca: DCA with vLLM's length temperature (`original_max_position_embeddings` = trained
            length: logits x max(1, 0.1 ln(L/orig) + 1)^2, YaRN's attention-scaling formula), which is
            what Qwen2.5-1M ships as "DCA with YaRN"; vLLM ignores rope_scaling next to a DCA config,
            so YaRN's frequencies are not part of it (megaqwen refuses --yarn with --dca).
Writes benchmarks/extrapolation.png (four heat maps, depth x length, chance marked) and
extrapolation.json next to it; prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from megaqwen.eval import build_for_eval, long_context_config
from megaqwen.models import build_model
from megaqwen.models.config import get_config

FILLER, KEY_SYMBOLS, KEY = 32, 16, 48  # ids 0-31 filler, 32-47 key symbols, 48 the KEY marker
VOCAB = 64
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
CHANCE = 1 / KEY_SYMBOLS**2


def make_batch(n: int, length: int, g: torch.Generator, depth: float | None = None):
    """(tokens (n, length), labels (n, length), answer positions (n, 2)): the needle at `depth`
    (uniform over [0, 1] when None), the question `KEY` at length - 3, the answer after it."""
    tokens = torch.randint(0, FILLER, (n, length), generator=g)
    ab = torch.randint(FILLER, FILLER + KEY_SYMBOLS, (n, 2), generator=g)
    room = length - 3 - 3  # needle start in [0, room]: it ends before the question
    d = torch.rand(n, generator=g) if depth is None else torch.full((n,), depth)
    start = (d * room).round().long()
    rows = torch.arange(n)
    tokens[rows, start], tokens[rows, start + 1], tokens[rows, start + 2] = KEY, ab[:, 0], ab[:, 1]
    q = length - 3
    tokens[:, q], tokens[:, q + 1], tokens[:, q + 2] = KEY, ab[:, 0], ab[:, 1]
    labels = torch.full_like(tokens, -100)
    labels[:, q], labels[:, q + 1] = ab[:, 0], ab[:, 1]  # predict a after KEY, b after a
    return tokens, labels, torch.tensor([q, q + 1])


def train(cfg, steps: int, length: int, batch: int, lr: float, seed: int = 0):
    model = build_model(cfg, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        tokens, labels, _ = make_batch(batch, length, g)
        parts = model(tokens, labels=labels)
        loss = parts.sum / parts.count
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            rate = step / (time.time() - t0)
            print(f"train step {step}/{steps} loss {loss.item():.3f} ({rate:.1f} steps/s, ETA "
                  f"{(steps - step) / rate:.0f} s)", file=sys.stderr, flush=True)
    return model.eval()


METHODS = {  # name -> long_context_config kwargs, given the trained length n
    "rope": lambda n: {},
    "yarn": lambda n: {"yarn": 4.0, "yarn_original": n},
    "dca": lambda n: {"dca": (n, n // 8)},
    "yarn+dca": lambda n: {"dca": (n, n // 8), "dca_original": n},
}


@torch.no_grad()
def accuracy(model, length: int, depth: float, trials: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    tokens, labels, at = make_batch(trials, length, g, depth)
    logits = model(tokens[:, :at[-1] + 1])[:, at]  # (trials, 2, V)
    return (logits.argmax(-1) == labels[:, at]).all(-1).float().mean().item()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, n = result["lengths"], result["train_len"]
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4.2 * len(METHODS), 3.6), sharey=True)
    for ax, name in zip(axes, METHODS):
        grid = result["accuracy"][name]  # [depth][length]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{ln}\n({ln // n}x)" for ln in lengths])
        ax.set_yticks(range(len(DEPTHS)), [f"{d:g}" for d in DEPTHS])
        ax.axvline(0.5, color="black", ls="--", lw=1.2)  # right of it: beyond the trained length
        ax.set_title(f"{name}: mean {result['mean'][name]:.2f}", fontsize=10)
        ax.set_xlabel("context length (tokens)")
    axes[0].set_ylabel("needle depth")
    bar = fig.colorbar(im, ax=axes, label="retrieval accuracy", fraction=0.02)
    bar.ax.axhline(CHANCE, color="black", lw=3)
    bar.ax.text(1.0, 0.06, f"chance\n{CHANCE:.4f}", transform=bar.ax.get_yaxis_transform(), va="bottom",
                fontsize=7)
    fig.suptitle(f"key retrieval, debug model trained at {n} tokens ({result['trials']} keys per cell; "
                 f"chance {CHANCE:.4f}; dashed: trained length)", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--trials", type=int, default=32, help="keys per (length, depth) cell")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "extrapolation.png"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # 1: ~0.2 s/step on a busy 2-core VM (2 threads: ~2 s)
    n = args.train_len
    cfg = get_config("debug", vocab_size=VOCAB, max_position_embeddings=n)
    t0 = time.time()
    model = train(cfg, args.steps, n, args.batch, args.lr)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lengths = [n, 2 * n, 4 * n, 8 * n]
    result = {"train_len": n, "lengths": lengths, "depths": DEPTHS, "trials": args.trials,
              "steps": args.steps, "chance": CHANCE, "accuracy": {}, "mean": {}}
    for name, kw in METHODS.items():
        evaluated = build_for_eval(long_context_config(cfg, **kw(n)), weights, "cpu",
                                   yarn_requested=False)
        grid = [[accuracy(evaluated, ln, d, args.trials, seed=1000 + i * 10 + j)
                 for j, ln in enumerate(lengths)] for i, d in enumerate(DEPTHS)]
        result["accuracy"][name] = grid
        result["mean"][name] = sum(map(sum, grid)) / (len(grid) * len(lengths))
        print(f"evaluated {name} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out)
    print(f"| method | {' | '.join(f'{ln} ({ln // n}x)' for ln in lengths)} |")
    print("|---|" + "---:|" * len(lengths))
    for name, grid in result["accuracy"].items():
        cols = [sum(grid[i][j] for i in range(len(DEPTHS))) / len(DEPTHS) for j in range(len(lengths))]
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cols) + " |")
    print(f"\nmean retrieval accuracy over {len(DEPTHS)} depths x {args.trials} keys; chance {CHANCE:.4f}; "
          f"{result['seconds']} s total; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
