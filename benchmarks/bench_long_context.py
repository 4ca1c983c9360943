"""Long-context forward+backward of the debug model on CPU: peak memory and time per sequence length.

    python benchmarks/bench_long_context.py                        # T = 8K, 16K, 32K, 64K
    python benchmarks/bench_long_context.py --lengths 8192 16384 --dense-max 8192

One process, batch 1, fp32, the CPU kernels `auto` picks (chunked cross-entropy), loss + backward.
Per length three attention inputs:
  causal      one document: SDPA's flash kernel (is_causal)
  packed      documents of random lengths (mean --doc-len) with per-document masks: one SDPA call
              per document (kernels/attention.py, the path past DENSE_MASK_MAX_T)
  dense-mask  the same packed batch through the old path, one SDPA call with the (1, 1, T, T) mask
              (the baseline; only up to --dense-max tokens, beyond it does not fit)
"peak MiB" is the peak resident memory during the step minus the resident memory just before it
(model, batch, after a 256-token warm-up step); every row runs in a fresh process (memory freed
by an earlier row would stay resident and hide what the next one needs) and the peak is reset
through /proc/self/clear_refs before the step. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import torch


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _packed_ids(t: int, mean_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lens, total = [], 0
    while total < t:
        n = int(torch.randint(mean_len // 4, 2 * mean_len, (1,), generator=g))
        lens.append(min(n, t - total))
        total += lens[-1]
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None], len(lens)


def step(model, tokens, ids) -> tuple[float, float]:
    """(seconds, peak MiB above the RSS before the step) of one loss forward + backward."""
    model.zero_grad(set_to_none=True)
    base = _rss_mib()
    _reset_peak()
    t0 = time.perf_counter()
    parts = model(tokens[:, :-1], labels=tokens[:, 1:], document_ids=ids)
    (parts.sum / parts.count).backward()
    seconds = time.perf_counter() - t0
    return seconds, _status_kib("VmHWM:") / 1024 - base


NAMES = {"causal": "causal", "packed": "packed, per document", "dense": "packed, dense mask (old)"}


def run_row(args: argparse.Namespace, t: int, key: str) -> dict:
    """One (length, attention) row in this process: seconds, peak MiB, documents."""
    from megaqwen.kernels.attention import sdpa_dense
    from megaqwen.kernels.registry import resolve_ops
    from megaqwen.models import build_model
    from megaqwen.models.config import get_config

    cfg = get_config("debug", max_position_embeddings=t + 1,
                     **({"vocab_size": args.vocab} if args.vocab else {}))
    ops = resolve_ops(device="cpu")
    if key == "dense":
        ops = dataclasses.replace(ops, attention=sdpa_dense)
    model = build_model(cfg, ops, seed=0)
    step(model, torch.randint(0, cfg.vocab_size, (1, 257)), None)  # warm up kernels (small)
    tokens = torch.randint(0, cfg.vocab_size, (1, t + 1), generator=torch.Generator().manual_seed(t))
    ids, n_docs = _packed_ids(t, args.doc_len, seed=t)
    seconds, peak = step(model, tokens, None if key == "causal" else ids)
    return {"seconds": seconds, "peak_mib": peak, "documents": 1 if key == "causal" else n_docs,
            "describe": f"debug model ({cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} "
                        f"heads, head_dim {cfg.head_dim_}, vocab {cfg.vocab_size}), fp32, "
                        f"{args.threads} threads, ops: {ops.describe()}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--dense-max", type=int, default=8192, help="longest T for the dense-mask baseline")
    p.add_argument("--doc-len", type=int, default=2048, help="mean document length of packed rows")
    p.add_argument("--rows", nargs="+", default=["causal", "packed", "dense"],
                   help="which attention inputs to run: causal packed dense")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=0, help="override the vocabulary (0: the debug "
                   "model's 151,936; its LM head dominates time but not peak memory)")
    p.add_argument("--one", nargs=2, metavar=("T", "ROW"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:  # a worker: one row, one JSON line
        print(json.dumps(run_row(args, int(args.one[0]), args.one[1])))
        return
    passthrough = ["--doc-len", str(args.doc_len), "--threads", str(args.threads), "--vocab", str(args.vocab)]
    header = False
    for t in args.lengths:
        for key in ("causal", "packed", "dense"):
            if key not in args.rows or (key == "dense" and t > args.dense_max):
                continue
            # a fresh process per row: freed memory stays resident, so a second row in one process
            # would measure less than it needs
            res = subprocess.run([sys.executable, __file__, "--one", str(t), key, *passthrough],
                                 capture_output=True, text=True)
            if res.returncode:
                print(f"| {t} | {NAMES[key]} | failed: {res.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if not header:
                print(r["describe"])
                print("\n| T | attention | documents | fwd+bwd s | peak MiB | MiB per 1K tokens |")
                print("|---:|---|---:|---:|---:|---:|")
                header = True
            print(f"| {t} | {NAMES[key]} | {r['documents']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} "
                  f"| {r['peak_mib'] / t * 1024:.1f} |", flush=True)


if __name__ == "__main__":
    main()
