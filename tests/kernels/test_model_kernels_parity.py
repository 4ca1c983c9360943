"""A few AdamW steps of the debug model with every kernel on equal the run with all references."""

import torch

from megaqwen.kernels.registry import KernelConfig, resolve_ops
from megaqwen.models import get_config
from megaqwen.models.qwen2 import build_model

ALL_ON = KernelConfig(rmsnorm="triton", swiglu="triton", rope="triton", cross_entropy="triton",
                      attention="sdpa")
ALL_OFF = KernelConfig(rmsnorm="torch", swiglu="torch", rope="torch", cross_entropy="torch",
                       attention="sdpa")


def _train(kernels: KernelConfig, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    cfg = get_config("debug", vocab_size=97, hidden_size=48, intermediate_size=88, num_layers=2,
                     num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = build_model(cfg, ops=resolve_ops(kernels, device="cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    labels[:, -1] = -100
    # two packed documents in row 0: positions restart, attention is per document
    position_ids = torch.tensor([list(range(6)) + list(range(7)), list(range(13))])
    document_ids = torch.tensor([[0] * 6 + [1] * 7, [0] * 13])
    losses, first_grads = [], {}
    for step in range(steps):
        opt.zero_grad()
        loss = model(tokens, labels=labels, position_ids=position_ids, document_ids=document_ids).mean()
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


def test_debug_model_training_with_kernels_matches_references():
    on, grads_on = _train(ALL_ON)
    off, grads_off = _train(ALL_OFF)
    assert on[-1] < on[0]  # it trains
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=1e-5, atol=1e-6)
    # Gradients, not parameters after AdamW: Adam divides by sqrt(v), which turns fp32 rounding
    # noise in near-zero gradients (e.g. k_proj.bias) into full learning-rate-sized differences.
    for name, g in grads_off.items():
        scale = g.abs().max().clamp(min=1e-12)
        assert (grads_on[name] - g).abs().max() / scale < 1e-4, name
