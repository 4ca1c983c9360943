"""Synchronous vs asynchronous checkpoint saves: how long training stands still.

One process builds a model with AdamW state, then saves it through the trainer's `Checkpointer`
(`megaqwen/train/checkpoint.py`) both ways, `--repeats` times each:
  sync   the step waits for the whole write (the baseline);
  async  the step waits for the copy to host memory; the write runs in a background thread while
         training steps run (their time, against steps with no write in flight, shows what the
         background write costs on this machine's cores).

    python benchmarks/bench_checkpoint.py                        # Qwen2.5-0.5B config, 4 layers
    python benchmarks/bench_checkpoint.py --model qwen2.5-0.5b --layers 24
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megaqwen.models.config import get_config
from megaqwen.models.qwen2 import build_model
from megaqwen.train.checkpoint import Checkpointer


def _step(model, opt, tokens) -> float:
    t0 = time.perf_counter()
    model(tokens, tokens).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(get_config(args.model, num_layers=args.layers))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = get_config(args.model, num_layers=args.layers)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq))
    _step(model, opt, tokens)  # optimizer state exists
    n = sum(p.numel() for p in model.parameters())
    state_gib = n * 4 * 3 / 2**30  # fp32 weights + two Adam moments
    quiet = [_step(model, opt, tokens) for _ in range(3)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            saver = Checkpointer(Path(tmp) / mode, async_save=mode == "async", keep_last=1)
            for i in range(args.repeats):
                t0 = time.perf_counter()
                out = saver.save(i + 1, model, opt, {"consumed_samples": 0})
                blocking = time.perf_counter() - t0
                during = []
                while mode == "async" and not saver.poll():  # train while the write is in flight
                    during.append(_step(model, opt, tokens))
                total = time.perf_counter() - t0
                rows.append((mode, i + 1, blocking, out.get("checkpoint_save_s", total), total, during))
            saver.close()
    quiet_s = statistics.median(quiet)
    print(f"model {args.model} with {args.layers} layers: {n / 1e6:.1f}M parameters, "
          f"{state_gib:.2f} GiB of fp32 state; one training step (seq {args.seq}) {quiet_s:.2f} s "
          f"with no write in flight; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'mode':<6} {'save':>4} {'training waited s':>18} {'write done after s':>19} "
          f"{'steps during write':>19} {'their median s':>15}")
    for mode, i, blocking, _, total, during in rows:
        med = f"{statistics.median(during):.2f}" if during else "-"
        print(f"{mode:<6} {i:>4} {blocking:>18.2f} {total:>19.2f} {len(during):>19} {med:>15}")
    sync_wait = statistics.median(r[2] for r in rows if r[0] == "sync")
    async_wait = statistics.median(r[2] for r in rows if r[0] == "async")
    print(f"median wait: sync {sync_wait:.2f} s, async {async_wait:.2f} s -> training waits "
          f"{sync_wait / max(async_wait, 1e-9):.1f}x less with async_save")


if __name__ == "__main__":
    main()
