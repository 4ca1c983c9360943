import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import megaqwen.train.main  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from megaqwen.data.indexed import IndexedDatasetBuilder

VOCAB = 512
EOD = 3  # any id works for packing tests; the real EOD (151643) needs the full vocabulary


@pytest.fixture(scope="session")
def shard(tmp_path_factory):
    """Learnable random documents (next id = 7 * id + 3 mod V, 10% noise) ending in an EOD id."""
    prefix = tmp_path_factory.mktemp("data") / "random"
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix) as b:
        for _ in range(200):
            n = int(rng.integers(20, 300))
            doc = np.empty(n, dtype=np.int64)
            doc[0] = rng.integers(4, VOCAB)
            noise = rng.random(n) < 0.1
            for i in range(1, n):
                doc[i] = rng.integers(4, VOCAB) if noise[i] else (7 * doc[i - 1] + 3) % VOCAB
            b.add_document(np.append(doc, EOD))
    return str(prefix)


def _make_config(out_dir, data_path, *overrides):
    """A validated Config from the real conf/ tree plus overrides, as the CLI would build it."""
    base = [f"train.out_dir={out_dir}", f"data.path={data_path}", f"model.vocab_size={VOCAB}",
            "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.steps=6", "train.save_every=3", "train.warmup_steps=2", "logger.wandb.enabled=false",
            "data.document_mask=false", "data.reset_position_ids=false"]
    with initialize_config_module("megaqwen.conf", version_base="1.3"):
        dcfg = compose("config", overrides=base + list(overrides))
    return OmegaConf.to_object(dcfg)


@pytest.fixture
def make_config():
    return _make_config
