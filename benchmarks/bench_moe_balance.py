"""Cost of the global-batch balancing's counting pre-pass (`megaqwen.train.moe_balance`): one step of
M micro-batches (forward + backward with the aux loss) with and without the no-grad counting forwards
the exact global-batch form adds, on one process, one thread. Prints a table: CPU ms per step (the
process's CPU time: steadier than wall time on a shared machine) and the pre-pass's share.

    python benchmarks/bench_moe_balance.py [--model debug-qwen3-moe] [--micro 4] [--rows 2] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from megaqwen.models.config import get_config
from megaqwen.models.moe_balance import RoutingCounts
from megaqwen.models.spec import get_spec


def step(model, micro, prepass: bool) -> float:
    t0 = time.process_time()
    if prepass:
        counts = RoutingCounts(model.cfg.num_experts, "global_batch")
        with torch.no_grad():
            for tokens in micro:
                records: list = []
                pos = torch.arange(tokens.shape[1]).expand_as(tokens)
                model.hidden_states(tokens, pos, records=records)
                counts.observe(records)
    for tokens in micro:
        parts = model(tokens, tokens.roll(-1, 1))
        (parts.mean() + 0.001 * parts.aux).backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="debug-qwen3-moe")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = replace(get_config(a.model, vocab_size=4096), moe_balance="global_batch")
    model = get_spec(cfg).build(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, cfg.vocab_size, (a.rows, a.seq), generator=g) for _ in range(a.micro)]
    step(model, micro, True)  # warm-up
    times = {False: [], True: []}
    for i in range(a.repeats):
        for pre in (False, True):
            times[pre].append(step(model, micro, pre))
            print(f"  repeat {i + 1}/{a.repeats} pre-pass={pre}: {times[pre][-1] * 1e3:.0f} ms", flush=True)
    base, pre = statistics.median(times[False]), statistics.median(times[True])
    threads = torch.get_num_threads()
    print(f"\n{a.model}, {a.micro} micro-batches x {a.rows} x {a.seq} tokens, {threads} threads")
    print("| step | CPU ms (median) | vs without |")
    print("| --- | --- | --- |")
    print(f"| fwd+bwd, local counts | {base * 1e3:.0f} | 1.00x |")
    print(f"| + counting pre-pass (global_batch exact) | {pre * 1e3:.0f} | {pre / base:.2f}x |")


if __name__ == "__main__":
    main()
