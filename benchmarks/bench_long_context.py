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
(model, batch); the peak is reset before each step through /proc/self/clear_refs, so one process
measures every row. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from megaqwen.kernels.attention import sdpa_dense
    from megaqwen.kernels.registry import resolve_ops
    from megaqwen.models import build_model
    from megaqwen.models.config import get_config

    cfg = get_config("debug", max_position_embeddings=max(args.lengths) + 1,
                     **({"vocab_size": args.vocab} if args.vocab else {}))
    ops = resolve_ops(device="cpu")
    model = build_model(cfg, ops, seed=0)
    dense = build_model(cfg, dataclasses.replace(ops, attention=sdpa_dense), seed=0)
    dense.load_state_dict(model.state_dict())
    print(f"debug model ({cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, head_dim "
          f"{cfg.head_dim_}, vocab {cfg.vocab_size}), fp32, {args.threads} threads, ops: {ops.describe()}")
    step(model, torch.randint(0, cfg.vocab_size, (1, 513)), None)  # warm up allocator and kernels
    print("\n| T | attention | documents | fwd+bwd s | peak MiB | MiB per 1K tokens |")
    print("|---:|---|---:|---:|---:|---:|")
    for t in args.lengths:
        tokens = torch.randint(0, cfg.vocab_size, (1, t + 1), generator=torch.Generator().manual_seed(t))
        ids, n_docs = _packed_ids(t, args.doc_len, seed=t)
        rows = [("causal", "causal", model, None, 1), ("packed", "packed, per document", model, ids, n_docs)]
        if t <= args.dense_max:
            rows.append(("dense", "packed, dense mask (old)", dense, ids, n_docs))
        for key, name, m, doc_ids, docs in rows:
            if key not in args.rows:
                continue
            seconds, peak = step(m, tokens, doc_ids)
            print(f"| {t} | {name} | {docs} | {seconds:.1f} | {peak:.0f} | {peak / t * 1024:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
