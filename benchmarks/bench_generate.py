"""Rollout throughput of the generation engines (issue 23): generated tokens per second for one
batch of prompts of different lengths, sampled (temperature 1, fixed seed), no stop token, so every
row generates --new tokens.

  native           our model with the KV cache (megaqwen.generate, engine=native)
  native-no-cache  the same model re-running the whole sequence at every step (what generation
                   costs without the cache; same tokens greedy, shown for the speed-up)
  hf               transformers `generate` on the same weights (engine=hf, exported in memory)

Configs: `debug` (2 layers, hidden 64, the 152K vocabulary) and `small` (4 layers, hidden 256, 8
heads / 2 KV heads, vocabulary 32K). Each number is the best of --repeat runs after a 2-token warm-up.

    python benchmarks/bench_generate.py [--batch 8] [--new 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from megaqwen.generate import SamplingParams, build_engine
from megaqwen.generate.sampling import sample_next
from megaqwen.kernels.attention import KVCache
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec


def configs():
    debug = get_config("debug")
    small = dataclasses.replace(debug, name="small", hidden_size=256, intermediate_size=704, num_layers=4,
                                num_heads=8, num_kv_heads=2, vocab_size=32768)
    return {"debug": debug, "small": small}


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 65, (batch,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def no_cache_generate(model, rows: list[list[int]], params: SamplingParams) -> int:
    """Every step re-runs the whole left-padded batch (a fresh cache each step: full prefill)."""
    gen = torch.Generator().manual_seed(params.seed)
    seqs = [list(r) for r in rows]
    for _ in range(params.max_new_tokens):
        width = max(map(len, seqs))
        pad = torch.tensor([width - len(s) for s in seqs])
        tokens = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
        slot = torch.arange(width)[None]
        pos, valid = (slot - pad[:, None]).clamp(min=0), slot >= pad[:, None]
        cache = KVCache(len(seqs), width, "cpu")
        h = model.hidden_states(tokens, pos, cache.step(pos, valid))
        tok, _ = sample_next(model.logits(h[:, -1]), params, gen)
        for s, t in zip(seqs, tok.tolist()):
            s.append(t)
    return len(rows) * params.max_new_tokens


def timed(fn, args: tuple, params: SamplingParams, repeat: int) -> float:
    fn(*args, dataclasses.replace(params, max_new_tokens=2))  # warm-up (allocator, first calls)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args, params)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=0)
    print(f"batch {args.batch} prompts of 16-64 tokens, {args.new} new tokens each, "
          f"{args.threads} threads, fp32 CPU")
    print(f"{'config':8} {'engine':16} {'tokens/s':>9} {'s/batch':>8} {'vs hf':>6}")
    for name, cfg in configs().items():
        model = get_spec(cfg).build(cfg, seed=0).eval()
        rows = prompts(args.batch, cfg.vocab_size)
        native, hf = build_engine("native", model), build_engine("hf", model)
        total = args.batch * args.new
        runs = {"native": (native.generate, rows), "native-no-cache": (no_cache_generate, model, rows),
                "hf": (hf.generate, rows)}
        times = {k: timed(fn, tuple(a), params, args.repeat) for k, (fn, *a) in runs.items()}
        for engine, s in times.items():
            print(f"{name:8} {engine:16} {total / s:9.0f} {s:8.2f} {times['hf'] / s:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
