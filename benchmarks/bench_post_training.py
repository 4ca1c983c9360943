"""Post-training throughput against pretraining on the same layout (issue 22): the trainer's own runs
of the debug model on the shipped data, one after the other in this process.

  pretrain  train.objective=lm on the shipped sample corpus (packed text)
  sft       train.objective=sft on the shipped toy chat set (packed conversations, loss on assistant
            tokens only)
  dpo       train.objective=dpo on the shipped toy preferences (one pair per two rows, padded; the
            frozen reference model's forward included), starting from the sft run's checkpoint

For each: the trainer's tokens/s (positions per second: global batch x seq_len / step time, median
of the steps after the first two), the share of positions that hold a real token (packing
efficiency: real / padded), the share that are trained on (labels != -100), and real tokens/s.
Ratios are against pretraining in the same run. CPU: about two minutes.

    python benchmarks/bench_post_training.py [--seq-len 256] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import megaqwen.train.main  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from megaqwen.data.blend import build_dataset
from megaqwen.data.chat import tokenize_chat
from megaqwen.data.tokenize import shipped_sample_corpus, tokenize_files, write_summary
from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.train.loop import train


def config(out: Path, data: str, seq: int, steps: int, *overrides: str):
    base = [f"train.out_dir={out}", f"data.path={data}", "model=debug", f"train.seq_len={seq}",
            "train.global_batch_size=8", "train.micro_batch_size=4", f"train.steps={steps}",
            "train.save_every=0", "train.warmup_steps=1", "train.lr=1e-3", "logger.wandb.enabled=false",
            "train.device=cpu", "data.valid_fraction=0"]
    with initialize_config_module("megaqwen.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=base + list(overrides)))
    cfg.validate()
    return cfg


def shares(cfg, samples: int) -> tuple[float, float]:
    """(real-token share, trained share) of the run's first `samples` samples (its own dataset)."""
    ds = build_dataset(cfg.data.path, seq_len=cfg.train.seq_len, num_samples=samples, seed=cfg.train.seed)
    real = trained = total = 0
    for i in range(samples):
        s = ds[i]
        labels = s["labels"]
        n = labels.numel()
        total += n
        trained += int((labels != IGNORE_INDEX).sum())
        # padding (pair rows only) is a second document after the row's own: document id > 0
        pair_row = cfg.train.objective == "dpo"
        real += int((s["document_ids"] == 0).sum()) if pair_row else n
    return real / total, trained / total


def run(name: str, cfg, samples: int) -> dict:
    t0 = time.perf_counter()
    train(cfg)
    rows = [json.loads(x) for x in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    rate = statistics.median(r["tokens_per_s"] for r in rows[2:])
    real, trained = shares(cfg, samples)
    return {"mode": name, "tokens_per_s": rate, "real": real, "trained": trained,
            "real_tokens_per_s": rate * real, "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    samples = shipped_sample_corpus().parent
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_summary(tokenize_files([shipped_sample_corpus()], str(d / "text")))
        tokenize_chat([str(samples / "chat.jsonl")], str(d / "chat"))
        tokenize_chat([str(samples / "preferences.jsonl")], str(d / "prefs"), "dpo")
        n = 8 * args.steps
        results = [run("pretrain", config(d / "pre", str(d / "text"), args.seq_len, args.steps), n),
                   run("sft", config(d / "sft", str(d / "chat"), args.seq_len, args.steps,
                                     "train.objective=sft"), n)]
        results.append(run("dpo", config(d / "dpo", str(d / "prefs"), args.seq_len, args.steps,
                                          "train.objective=dpo", f"train.init_from={d / 'sft'}"), n))
    base = results[0]
    print(f"debug model, seq_len {args.seq_len}, global batch 8, micro-batch 4, one CPU process, "
          f"{args.steps} steps each (median tokens/s of steps 3+)")
    print("| mode | tokens/s (positions) | vs pretrain | real tokens / positions | trained / positions "
          "| real tokens/s | vs pretrain |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | "
              f"{r['real']:.1%} | {r['trained']:.1%} | {r['real_tokens_per_s']:,.0f} | "
              f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f} |")


if __name__ == "__main__":
    main()
