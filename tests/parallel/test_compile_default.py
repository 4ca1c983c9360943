"""parallel.compile=auto|true|false: auto compiles the layers on CUDA with the native engine only;
what Hydra makes of `parallel.compile=true` on the str field is read as true; unknown values fail."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from megaqwen.parallel.activation import compile_enabled
from megaqwen.parallel.config import ParallelConfig


def test_auto_is_cuda_with_the_native_engine():
    assert ParallelConfig().compile == "auto"
    assert compile_enabled("auto", "cuda")
    assert not compile_enabled("auto", "cpu")
    assert not compile_enabled("auto", "cuda", native_engine=False)
    for setting, want in ((True, True), ("true", True), ("True", True), (False, False), ("false", False)):
        assert compile_enabled(setting, "cpu") is want


def test_hydra_bool_override_reads_as_true_and_bad_values_fail():
    cfg = OmegaConf.merge(OmegaConf.structured(ParallelConfig), OmegaConf.from_dotlist(["compile=true"]))
    assert compile_enabled(cfg.compile, "cpu")
    with pytest.raises(ValueError, match=r"parallel.compile='sometimes' is unknown"):
        compile_enabled("sometimes", "cuda")
