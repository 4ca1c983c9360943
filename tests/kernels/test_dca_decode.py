"""KV-cache decoding with Dual Chunk Attention (megaqwen.generate's native engine over a model built
with `dca_ops`) equals full-sequence DCA on the same tokens: greedy tokens and their log-probs of
left-padded prompts decoded across several chunks.

With the length temperature on and L past original_max_position, the step's s_L^2 applies to all of
its query's logits (the cached keys carry none), so the attention of the new token equals the full
sequence's; but in a full sequence every earlier token is also a query at s_L, while a decoded
token was one at the length of its own step, so from the second layer on (keys/values of earlier
tokens) decoding and full-sequence prefill differ by construction, in vLLM as here. Hence the
temperature case runs a one-layer model, where the equality is exact."""

import pytest
import torch

from megaqwen.generate.api import SamplingParams
from megaqwen.generate.native import NativeEngine
from megaqwen.kernels.dca import DCAConfig, dca_ops
from megaqwen.kernels.registry import KernelOps
from megaqwen.models import build_model
from megaqwen.models.config import get_config


def _dca_model(orig: int, layers: int):
    cfg = get_config("debug", vocab_size=128, dca_chunk_size=16, dca_local_size=4,
                     dca_original_max_position=orig, num_layers=layers)
    model = build_model(cfg, dca_ops(KernelOps(), DCAConfig(16, 4, orig)), seed=0).eval()
    with torch.no_grad():  # bigger q/k so that positions move the logits
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(20)
    return model


@pytest.mark.parametrize("orig,layers", [(0, 2), (8, 1)])
def test_kv_cache_decoding_equals_full_sequence_dca(orig, layers):
    model = _dca_model(orig, layers)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 23, 14)]
    outs = NativeEngine(model).generate(prompts, SamplingParams(max_new_tokens=30, greedy=True))
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        with torch.no_grad():
            for tok, logp in zip(out.token_ids, out.logprobs):
                full = model(torch.tensor([seq]))[0, -1].float().log_softmax(-1)  # (V,)
                assert tok == int(full.argmax())
                assert abs(logp - full[tok].item()) <= 1e-4
                seq.append(tok)
        assert len(seq) - len(prompt) == 30 and len(seq) > 2 * 12  # decoded past two chunks (s = 12)


def test_generation_loads_a_dca_checkpoint_with_dca(tmp_path):
    """`megaqwen-generate` (generate.loading.load_model) builds a checkpoint whose config has DCA with
    its ops, as vLLM serves it; without DCA in the config, plain attention."""
    from megaqwen.generate.loading import load_model
    from megaqwen.kernels.dca import dca_settings, uses_dca
    from megaqwen.train.checkpoint import save_checkpoint

    model = _dca_model(8, 1)
    for name, cfg in (("dca", model.cfg), ("plain", get_config("debug", vocab_size=128, num_layers=1))):
        save_checkpoint(tmp_path / name, 1, model, None,
                        {"consumed_samples": 0, "model_config": cfg.to_dict()})
    loaded = load_model(tmp_path / "dca")
    assert dca_settings(loaded.ops) == DCAConfig(16, 4, 8)
    assert not uses_dca(load_model(tmp_path / "plain").ops)
    tokens = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))
