import os
import sys

import pytest
import torch

# Two cores on CI: keep each test process (and every spawned rank) to one intra-op thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)
# helpers shared by several test folders (peak_probe.py) are plain modules beside this file
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# the dependencies whose releases have broken or changed us before: each run says which it tested
REPORTED_VERSIONS = ("torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "kernels",
                     "hydra-core", "deepspeed", "numpy", "triton", "wandb", "datasketch")


def pytest_report_header(config):
    from importlib.metadata import PackageNotFoundError, version

    def _v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    return "dependencies: " + " ".join(f"{n}=={_v(n)}" for n in REPORTED_VERSIONS)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
