"""Dual Chunk Attention: the position rules on hand-computed cases, the chunked kernel against the
per-pair reference, and equality with ordinary attention inside one chunk."""

import dataclasses

import pytest
import torch

from megaqwen.kernels.dca import (
    dca_apply_rope,
    dca_attention,
    dca_attention_ref,
    dca_ops,
    dca_relative_positions,
    dca_rope,
)
from megaqwen.kernels.registry import KernelOps
from megaqwen.kernels.rope import yarn_inv_freq
from megaqwen.models import build_model
from megaqwen.models.config import get_config

_ = -1  # masked (key after query)
# chunk_size c = 5, local_size w = 2: chunks of s = 3 tokens. Written out by hand from the rules:
# same chunk i - j; previous chunk min(s + o_i, c - 1) - o_j; older chunks c - 1 - o_j.
HAND = [
    [0, _, _, _, _, _, _, _, _],
    [1, 0, _, _, _, _, _, _, _],
    [2, 1, 0, _, _, _, _, _, _],
    [3, 2, 1, 0, _, _, _, _, _],  # o=0: previous chunk from position 3 (true distances)
    [4, 3, 2, 1, 0, _, _, _, _],  # o=1 < w: still true distances
    [4, 3, 2, 2, 1, 0, _, _, _],  # o=2 >= w: capped at c - 1 = 4
    [4, 3, 2, 3, 2, 1, 0, _, _],  # chunk 0 is now inter-chunk: 4 - o_j
    [4, 3, 2, 4, 3, 2, 1, 0, _],
    [4, 3, 2, 4, 3, 2, 2, 1, 0],
]


def test_relative_positions_follow_the_rules_on_hand_computed_cases():
    assert dca_relative_positions(9, chunk_size=5, local_size=2).tolist() == HAND
    rel = dca_relative_positions(300, chunk_size=64, local_size=16)
    causal = torch.ones(300, 300, dtype=torch.bool).tril()
    assert rel[causal].max() == 63 and rel[causal].min() == 0  # never past the window c - 1
    assert rel[:48, :48][causal[:48, :48]].tolist() == [i - j for i in range(48) for j in range(i + 1)]


def _qkv(b, t, hq, hk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, h, d, generator=g) for h in (hq, hk, hk))


@pytest.mark.parametrize("t,chunk,local", [(9, 5, 2), (41, 12, 4), (40, 12, 4), (23, 9, 5), (7, 9, 5)])
def test_chunked_kernel_equals_per_pair_reference(t, chunk, local):
    """Odd lengths, partial last chunks, local >= chunk length, GQA, YaRN scale on cos/sin."""
    q, k, v = _qkv(2, t, 4, 2, 10)
    inv_freq, rope_scale = yarn_inv_freq(10, 100.0, 2.0, 8)
    positions = torch.arange(t).expand(2, t)
    cos, sin = dca_rope(positions, inv_freq, rope_scale, chunk, local)
    q3, k_ = dca_apply_rope(q, k, cos, sin)
    got = dca_attention(q3, k_, v, chunk_size=chunk, local_size=local)
    want = dca_attention_ref(q, k, v, inv_freq, rope_scale, chunk, local)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _models(chunk, local, vocab=1024):
    cfg = get_config("debug", vocab_size=vocab, dca_chunk_size=chunk, dca_local_size=local)
    plain = build_model(cfg, seed=0).eval()
    dca = build_model(cfg, dca_ops(KernelOps(), chunk, local), seed=0).eval()
    with torch.no_grad():  # bigger q/k so that positions move the logits
        for m in (plain, dca):
            for name, p in m.named_parameters():
                if "q_proj.weight" in name or "k_proj.weight" in name:
                    p.mul_(20)
    return plain, dca


def test_model_within_one_chunk_equals_ordinary_attention():
    plain, dca = _models(chunk=40, local=8)  # chunks of 32 tokens
    tokens = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dca(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
        long = torch.randint(0, 1024, (1, 70), generator=torch.Generator().manual_seed(1))
        a, b = dca(long), plain(long)
    torch.testing.assert_close(a[:, :32], b[:, :32], rtol=1e-5, atol=1e-5)  # first chunk unchanged
    assert (a[:, 40:] - b[:, 40:]).abs().max() > 1e-3  # past the window DCA changes positions


def test_dca_refuses_packed_documents_and_shifted_positions():
    _, dca = _models(chunk=40, local=8)
    tokens = torch.randint(0, 1024, (1, 10))
    with pytest.raises(ValueError, match="packed documents"):
        dca(tokens, document_ids=torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="0..T-1"):
        dca(tokens, position_ids=torch.arange(5, 15)[None])
    with pytest.raises(ValueError, match="local_size"):
        dca_ops(KernelOps(), 8, 8)
    no_dca_cfg = dataclasses.replace(dca.cfg, dca_chunk_size=0, dca_local_size=0)
    with pytest.raises(ValueError, match="local_size"):
        build_model(no_dca_cfg, dca.ops)(tokens)


def test_megaqwen_eval_runs_dca_and_yarn(tmp_path, capsys):
    """`megaqwen-eval loss --dca C W` scores with DCA (equal to the DCA model's own loss), and
    `--yarn` with YaRN; plain attention gives a different loss past the window."""
    import json

    from megaqwen.eval import main as eval_main
    from megaqwen.train.checkpoint import save_checkpoint

    plain, dca = _models(chunk=40, local=8)
    save_checkpoint(tmp_path / "ckpt", 1, plain, None,
                    {"consumed_samples": 0, "model_config": dataclasses.replace(
                        plain.cfg, dca_chunk_size=0, dca_local_size=0).to_dict()})
    ids = torch.randint(0, 1024, (71,), generator=torch.Generator().manual_seed(2))
    (tmp_path / "d.jsonl").write_text(json.dumps({"input_ids": ids.tolist()}))

    def run(*flags):
        assert eval_main(["loss", "--checkpoint", str(tmp_path / "ckpt"), "--data",
                          str(tmp_path / "d.jsonl"), "--max-len", "70", "--device", "cpu", *flags]) == 0
        return json.loads(capsys.readouterr().out)["loss"]

    with torch.no_grad():
        parts = dca(ids[None, :-1], labels=ids[None, 1:])
    assert abs(run("--dca", "40", "8") - (parts.sum / parts.count).item()) <= 1e-5
    assert abs(run() - run("--dca", "40", "8")) > 1e-4
    assert abs(run("--yarn", "4", "--yarn-original", "16") - run()) > 1e-4
