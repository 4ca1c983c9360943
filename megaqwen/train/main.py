"""`megaqwen-train`: the Hydra entry point over `conf/` (shipped as the `megaqwen.conf` package).

    megaqwen-train model=debug train.steps=20 train.lr=3e-4
    megaqwen-train model=qwen2.5-0.5b data.path=shards/recipe-4k.json logger.wandb.mode=online
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from megaqwen.train.config import Config, register_configs

log = logging.getLogger("megaqwen.train")

register_configs()


@hydra.main(config_path="pkg://megaqwen.conf", config_name="config", version_base="1.3")
def _app(dcfg: DictConfig) -> None:
    from megaqwen.parallel.setup import destroy
    from megaqwen.train.loop import train

    cfg: Config = OmegaConf.to_object(dcfg)
    try:
        summary = train(cfg)
    finally:
        destroy()  # leave the torchrun job cleanly (no-op in a single process)
    log.info("done: %s", summary["final"])


def main() -> None:
    if os.environ.get("RANK", "0") != "0":
        # under torchrun only rank 0 writes Hydra's config copy and log file into the run folder
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    _app()


if __name__ == "__main__":
    main()
