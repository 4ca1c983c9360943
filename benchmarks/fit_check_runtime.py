"""The CPU runtime and tokenizer terms of the start-up fit check (`megaqwen.train.fit_check`:
RUNTIME_BYTES, TOKENIZER_BYTES) against the whole trainer's measured peak: the debug model (its
151,936-row vocabulary), 2 AdamW steps, in a fresh process each, on a pre-tokenised random shard (no
tokenizer in the process) and on the shipped sample (tokenised by the run: the tokenizer loaded), at
256 and 8,192 tokens per micro-batch. tests/train/test_fit_check.py runs two of these four.

    python benchmarks/fit_check_runtime.py        # four runs, ~3 min on 2 idle cores

Prints, per run, the estimate, the measured peak (`peak_mem_gib_max`, VmHWM) and what the process held
besides the planner's terms (measured peak minus the estimate without the runtime and tokenizer terms):
the figures RUNTIME_BYTES (shard runs) and TOKENIZER_BYTES (the sample runs' excess) are set from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from memory_calibration import peak_gib  # benchmarks/, beside this script

GIB = 2**30
SHAPES = {256: ["train.seq_len=128"],  # micro-batch 2 (the default) x 128
          8192: ["train.seq_len=2048", "train.micro_batch_size=4", "train.global_batch_size=4"]}


def random_shard(folder: Path) -> str:
    """200 random documents of 20-300 ids below 512, each ending in id 3: the size and id range of the
    test's shard (tests/train/conftest.py), without its learnable chains (memory does not see them)."""
    from megaqwen.data.indexed import IndexedDatasetBuilder

    prefix = folder / "random"
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix) as b:
        for _ in range(200):
            b.add_document(np.append(rng.integers(4, 512, int(rng.integers(20, 300))), 3))
    return str(prefix)


def main() -> None:
    import megaqwen.train.main  # noqa: F401  (registers the config schema)
    from megaqwen.train import fit_check
    from megaqwen.train.preflight import compose_config

    work = Path(tempfile.mkdtemp(prefix="fit_runtime_"))
    shard = random_shard(work)
    print("| data | tokens per micro-batch | estimate GiB | measured GiB | estimate / measured "
          "| held besides the planner's terms GiB |")
    print("|---|---|---|---|---|---|")
    for label, data in (("pre-tokenised shard", shard), ("data.path=sample (tokenizer loaded)", "sample")):
        for tokens, shape in SHAPES.items():
            out = work / f"{'shard' if data == shard else 'sample'}-{tokens}"
            args = [f"data.path={data}", "train.steps=2", "train.save_every=0", "logger.wandb.enabled=false",
                    *shape]
            trainer = str(Path(sys.executable).parent / "megaqwen-train")
            run = subprocess.run([trainer, f"train.out_dir={out}", *args], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if run.returncode:
                raise SystemExit(f"{label} at {tokens} tokens failed:\n{run.stderr[-3000:]}")
            peak = peak_gib(out) * GIB
            rep = fit_check.check_fit(compose_config([f"train.out_dir={work / 'x'}", *args]), 1)
            cpu = rep.terms.get("runtime", 0.0) + rep.terms.get("tokenizer", 0.0)
            print(f"| {label} | {tokens:,} | {rep.total / GIB:.3f} | {peak / GIB:.3f} "
                  f"| {rep.total / peak:.2f} | {(peak - (rep.total - cpu)) / GIB:.2f} |", flush=True)


if __name__ == "__main__":
    main()
