import logging

import pytest
import torch

from megaqwen.kernels import registry
from megaqwen.kernels.registry import IMPLS, KernelConfig, build_adamw, resolve_ops


def test_auto_on_cpu_picks_references_chunked_ce_and_logs_why(caplog):
    with caplog.at_level(logging.DEBUG, logger="megaqwen.kernels.registry"):
        ops = resolve_ops(KernelConfig(), device="cpu")
    assert ops.choices == {"rmsnorm": "torch", "swiglu": "torch", "rope": "torch",
                           "cross_entropy": "chunked", "attention": "sdpa"}
    assert ops.rms_norm is IMPLS["rmsnorm"]["torch"]
    assert "kernels.attention = sdpa" in caplog.text
    assert "flash_attn runs on CUDA only" in caplog.text  # the reason vendor backends were skipped


def test_auto_on_cuda_prefers_triton_and_installed_vendor_libs(monkeypatch):
    present = {"flash_attn": False, "transformer_engine": True, "apex": False}
    monkeypatch.setattr(registry, "_module_present", lambda name: present[name])
    ops = resolve_ops(KernelConfig(), device="cuda")  # no GPU needed: resolution only
    assert ops.choices["rmsnorm"] == "triton" and ops.choices["cross_entropy"] == "triton"
    assert ops.choices["attention"] == "te"
    assert "flash: package `flash_attn` is not installed" in ops.reasons["attention"]


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    ops = resolve_ops(KernelConfig(rmsnorm="triton", cross_entropy="chunked"), device="cpu")
    assert ops.choices["rmsnorm"] == "triton" and ops.reasons["rmsnorm"] == "selected in config"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="kernels.rmsnorm='triton' cannot run here: .*TRITON_INTERPRET"):
        resolve_ops(KernelConfig(rmsnorm="triton"), device="cpu")


@pytest.mark.parametrize("op,name,match", [
    ("rmsnorm", "apex", "apex runs on CUDA only"),
    ("attention", "flash", "flash_attn runs on CUDA only"),
    ("rmsnorm", "cudnn", "unknown; choose from"),
])
def test_bad_explicit_choice_raises(op, name, match):
    with pytest.raises(ValueError, match=match):
        resolve_ops(KernelConfig(**{op: name}), device="cpu")


def test_vendor_choice_without_package_raises(monkeypatch):
    monkeypatch.setattr(registry, "_module_present", lambda name: False)
    with pytest.raises(ValueError, match="package `transformer_engine` is not installed"):
        resolve_ops(KernelConfig(rmsnorm="te"), device="cuda")


def test_build_adamw():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = build_adamw(params, "auto", device="cpu", lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ValueError, match="apex runs on CUDA only"):
        build_adamw(params, "apex", device="cpu", lr=1e-3)


@pytest.mark.gpu
def test_apex_and_te_norms_match_reference_gpu():
    x = torch.randn(9, 7, 41, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(41, device="cuda", dtype=torch.bfloat16)
    want = IMPLS["rmsnorm"]["torch"](x, w, 1e-6).float()
    for name, module in (("apex", "apex"), ("te", "transformer_engine")):
        if registry._module_present(module):
            got = IMPLS["rmsnorm"][name](x, w, 1e-6).float()
            assert (got - want).abs().max() / want.abs().max() < 2e-2, name


def test_conf_kernels_yaml_files_are_valid_configs():
    import dataclasses
    from pathlib import Path

    import yaml

    files = sorted((Path(__file__).resolve().parents[2] / "conf" / "kernels").glob("*.yaml"))
    assert {f.stem for f in files} >= {"auto", "torch", "triton"}
    fields = {f.name for f in dataclasses.fields(KernelConfig)}
    for f in files:
        data = yaml.safe_load(f.read_text())
        assert set(data) == fields, f"{f}: keys {sorted(data)} != KernelConfig fields {sorted(fields)}"
        cfg = KernelConfig(**data)
        if cfg.device != "cuda":
            resolve_ops(cfg, device="cpu")  # every CPU-valid file resolves (Triton via the interpreter)
