"""FP8 linears (train.fp8) against high precision on the debug model: the trainer's own runs
(`train(cfg)`), same seed and data, every linear of both debug layers in FP8
(train.fp8_skip_first_last=false: the debug model has only a first and a last layer). The vocabulary
is cut to 512 (as in the layout tests: the 151,936-row head dominates a CPU step), 4 x 64 tokens per
step at lr 3e-3, and the data is a learnable synthetic stream written here: documents made of 64
fixed 24-token phrases.

Reported per recipe: the loss at a few steps, the largest and mean |loss / loss_ref - 1| over all
steps and over the last 20, the final loss gap, and seconds per step (CPU: torch._scaled_mm there is
an emulation, so the time says nothing about a GPU's FP8 speed-up). The curves and their relative
difference go to --png.

    nice -n 10 python benchmarks/bench_fp8.py [--steps 100] [--dtype bf16] \
        [--recipes tensorwise,rowwise] [--jobs 3] [--png benchmarks/fp8_loss.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import megaqwen.train.main  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from megaqwen.train.loop import train

VOCAB = 512


def make_shard(prefix: Path) -> str:
    import numpy as np

    from megaqwen.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    phrases = rng.integers(4, VOCAB, (64, 24))
    with IndexedDatasetBuilder(prefix) as b:
        for _ in range(2000):
            doc = phrases[rng.integers(0, 64, int(rng.integers(2, 12)))].reshape(-1)
            b.add_document(doc.astype(np.int64))
    return str(prefix)


def run(recipe: str, steps: int, dtype: str, out: Path, shard: str) -> tuple[list[float], float]:
    """The losses of one run and its seconds per step."""
    overrides = ["model=debug", f"model.vocab_size={VOCAB}", f"data.path={shard}", "train.device=cpu",
                 "logger.wandb.enabled=false", f"train.steps={steps}", f"train.dtype={dtype}",
                 f"train.fp8={recipe}", "train.fp8_skip_first_last=false", "train.seq_len=64",
                 "train.global_batch_size=4", "train.micro_batch_size=4", "train.lr=3e-3",
                 "train.warmup_steps=10", "train.save_every=0", f"train.out_dir={out}", "train.log_every=10",
                 "train.fit_check=false"]
    with initialize_config_module("megaqwen.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    return losses, wall / steps


def table(curves: dict[str, list[float]], times: dict[str, float], ref: str) -> list[dict]:
    base = curves[ref]
    rows = []
    for name, c in curves.items():
        rel = [abs(a / b - 1) for a, b in zip(c, base)]
        rows.append({"run": name, "loss_1": c[0], "loss_50": c[min(49, len(c) - 1)], "loss_last": c[-1],
                     "max_rel": max(rel), "mean_rel": sum(rel) / len(rel), "max_rel_last20": max(rel[-20:]),
                     "final_gap": c[-1] - base[-1], "s_per_step": times[name]})
    return rows


def plot(curves: dict[str, list[float]], ref: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, c in curves.items():
        a.plot(range(1, len(c) + 1), c, label=name, lw=1)
        if name != ref:
            b.plot(range(1, len(c) + 1), [x / y - 1 for x, y in zip(c, curves[ref])], label=name, lw=1)
    a.set_ylabel("training loss")
    a.legend()
    a.set_title("debug model, every linear of both layers in FP8 vs the high-precision run")
    b.axhline(0, color="k", lw=0.5)
    b.set_ylabel(f"loss / loss({ref}) - 1")
    b.set_xlabel("step")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--dtype", default="bf16", help="train.dtype of every run (bf16: CPU autocast)")
    ap.add_argument("--recipes", default="tensorwise,rowwise")
    ap.add_argument("--png", type=Path, default=Path(__file__).parent / "fp8_loss.png")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes; s/step then "
                    "shares the cores)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("megaqwen",):
        logging.getLogger(name).setLevel(logging.WARNING)
    ref = f"none ({args.dtype})"
    curves, times = {}, {}
    recipes = ["none", *args.recipes.split(",")]
    pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"))
    with tempfile.TemporaryDirectory() as d, pool as ex:
        shard = make_shard(Path(d) / "docs")
        print(f"[bench_fp8] {', '.join(recipes)}: {args.steps} steps each, {args.jobs} at a time; "
              f"progress: {d}/<recipe>/metrics.jsonl", flush=True)
        futures = {r: ex.submit(run, r, args.steps, args.dtype, Path(d) / r, shard) for r in recipes}
        for recipe, fut in futures.items():
            name = ref if recipe == "none" else recipe
            curves[name], times[name] = fut.result()
            print(f"[bench_fp8] {name}: loss {curves[name][0]:.4f} -> {curves[name][-1]:.4f}, "
                  f"{times[name]:.3f} s/step", flush=True)
    rows = table(curves, times, ref)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    plot(curves, ref, args.png)
    print(f"[bench_fp8] wrote {args.png}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "curves": curves}, indent=1))


if __name__ == "__main__":
    main()
