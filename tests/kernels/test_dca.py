"""Dual Chunk Attention: the position rules on hand-computed cases, the chunked kernel against the
per-pair reference, equality with ordinary attention inside one chunk, packed/batched rows against
separate ones, and the KV-cache (explicit positions) path against the full sequence.
Equality with an independent port of vLLM's tables and prefill loop: test_dca_vllm.py."""

import dataclasses

import pytest
import torch

from megaqwen.kernels.dca import (
    DCAConfig,
    dca_apply_rope,
    dca_attention,
    dca_attention_positions,
    dca_attention_ref,
    dca_ops,
    dca_relative_positions,
    dca_rope,
)
from megaqwen.kernels.registry import KernelOps
from megaqwen.kernels.rope import rope_inv_freq
from megaqwen.models import build_model
from megaqwen.models.config import get_config

_ = -1  # masked (key after query)
# chunk_size c = 5, local_size w = 2: chunks of s = 3 tokens. Written out by hand from the rules:
# same chunk i - j; previous chunk min(s + o_i, cap) - o_j; older chunks min(2s - 1, cap) - o_j,
# cap = c (vLLM, ChunkLlama) or c - 1 (the paper's text).
HAND_VLLM = [
    [0, _, _, _, _, _, _, _, _],
    [1, 0, _, _, _, _, _, _, _],
    [2, 1, 0, _, _, _, _, _, _],
    [3, 2, 1, 0, _, _, _, _, _],  # o=0: previous chunk from position 3 (true distances)
    [4, 3, 2, 1, 0, _, _, _, _],  # o=1 < w: still true distances
    [5, 4, 3, 2, 1, 0, _, _, _],  # o=2 >= w: s + o = 5 = c, not capped
    [5, 4, 3, 3, 2, 1, 0, _, _],  # chunk 0 is now inter-chunk: min(2s - 1, c) = 5, minus o_j
    [5, 4, 3, 4, 3, 2, 1, 0, _],
    [5, 4, 3, 5, 4, 3, 2, 1, 0],
]
HAND_PAPER = [
    [0, _, _, _, _, _, _, _, _],
    [1, 0, _, _, _, _, _, _, _],
    [2, 1, 0, _, _, _, _, _, _],
    [3, 2, 1, 0, _, _, _, _, _],
    [4, 3, 2, 1, 0, _, _, _, _],
    [4, 3, 2, 2, 1, 0, _, _, _],  # capped at c - 1 = 4
    [4, 3, 2, 3, 2, 1, 0, _, _],
    [4, 3, 2, 4, 3, 2, 1, 0, _],
    [4, 3, 2, 4, 3, 2, 2, 1, 0],
]


def test_relative_positions_follow_the_rules_on_hand_computed_cases():
    assert dca_relative_positions(9, DCAConfig(5, 2)).tolist() == HAND_VLLM
    assert dca_relative_positions(9, DCAConfig(5, 2, variant="paper")).tolist() == HAND_PAPER
    causal = torch.ones(300, 300, dtype=torch.bool).tril()
    for variant, top in (("vllm", 64), ("paper", 63)):
        rel = dca_relative_positions(300, DCAConfig(64, 16, variant=variant))
        assert rel[causal].max() == top and rel[causal].min() == 0
        assert rel[:48, :48][causal[:48, :48]].tolist() == [i - j for i in range(48) for j in range(i + 1)]
    # w > c/2 (s = 6 < c/2): inter-chunk queries sit at 2s - 1 = 11, not c = 16
    rel = dca_relative_positions(40, DCAConfig(16, 10))
    assert rel[30, 0] == 11 and rel[30, 5] == 6 and rel[causal[:40, :40]].max() == 11


def _qkv(b, t, hq, hk, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, h, d, generator=g, dtype=dtype) for h in (hq, hk, hk))


def _dca(q, k, v, dca, inv_freq, attn=None, positions=None):
    b, t = q.shape[:2]
    positions = torch.arange(t).expand(b, t) if positions is None else positions
    cos, sin = dca_rope(positions, inv_freq, dca)
    q3, k_ = dca_apply_rope(q, k, cos, sin)
    return dca_attention(q3, k_, v, attn, dca=dca)


@pytest.mark.parametrize("variant", ["vllm", "paper"])
@pytest.mark.parametrize("t,chunk,local,orig", [(9, 5, 2, 0), (41, 12, 4, 8), (40, 12, 4, 0), (23, 9, 5, 4),
                                                (7, 9, 5, 0), (40, 16, 10, 16)])
def test_chunked_kernel_equals_per_pair_reference(t, chunk, local, orig, variant):
    """Odd lengths, partial last chunks, local >= chunk length, w > c/2, GQA, the temperature."""
    dca = DCAConfig(chunk, local, orig, variant)
    q, k, v = _qkv(2, t, 4, 2, 10, dtype=torch.float64)
    inv_freq = rope_inv_freq(10, 100.0).double()
    got = _dca(q, k, v, dca, inv_freq)
    torch.testing.assert_close(got, dca_attention_ref(q, k, v, inv_freq, dca), rtol=1e-10, atol=1e-10)


def test_temperature_is_vllms_formula():
    dca = DCAConfig(262144, 8192, 262144)
    assert dca.temperature(100_000) == 1.0  # clipped at 1 below the trained context
    assert dca.temperature(1_010_000) == pytest.approx(1.1349, abs=1e-4)  # logits x 1.288
    assert DCAConfig(16, 4).temperature(10**6) == 1.0  # off without original_max_position


def _models(chunk, local, orig=0, vocab=1024):
    cfg = get_config("debug", vocab_size=vocab, dca_chunk_size=chunk, dca_local_size=local,
                     dca_original_max_position=orig)
    plain = build_model(cfg, seed=0).eval()
    dca = build_model(cfg, dca_ops(KernelOps(), DCAConfig(chunk, local, orig)), seed=0).eval()
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


def test_packed_and_batched_rows_equal_separate_sequences():
    """Documents packed into rows (document ids, positions restarting at 0) and a batch of equal
    rows give each sequence's own DCA logits, temperature from each document's own length."""
    _, dca = _models(chunk=16, local=4, orig=8)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 1024, (n,), generator=g) for n in (37, 20, 43, 12, 8)]
    rows = [[0, 1, 2], [3, 4]]  # row 0: 100 tokens, row 1: 20 tokens + 80 padding (a 6th document)
    tokens, pos, doc = (torch.zeros(2, 100, dtype=torch.long) for _ in range(3))
    for r, members in enumerate(rows):
        at = 0
        for i, m in enumerate(members):
            n = len(docs[m])
            tokens[r, at:at + n], pos[r, at:at + n], doc[r, at:at + n] = docs[m], torch.arange(n), i
            at += n
        pos[r, at:], doc[r, at:] = torch.arange(100 - at), len(members)
    with torch.no_grad():
        packed = dca(tokens, position_ids=pos, document_ids=doc)
        for r, members in enumerate(rows):
            at = 0
            for m in members:
                n = len(docs[m])
                torch.testing.assert_close(packed[r, at:at + n], dca(docs[m][None])[0], rtol=1e-5, atol=1e-5)
                at += n
        batch = torch.stack([docs[0][:37], docs[4].repeat(5)[:37]])
        torch.testing.assert_close(dca(batch)[1], dca(batch[1:])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("orig", [0, 6])
def test_explicit_positions_decode_equals_the_full_sequence(orig):
    """The KV-cache path (queries and cached keys at explicit positions, keys rotated at their chunk
    offsets as stored, a key mask): prefill of a left-padded prompt, then one token at a time, each
    step equal to full-sequence DCA over the tokens so far (its temperature from their count)."""
    dca = DCAConfig(12, 4, orig)
    t, pad, prompt = 45, 3, 9
    q, k, v = _qkv(1, t, 4, 2, 8, seed=5, dtype=torch.float64)
    inv_freq = rope_inv_freq(8, 100.0).double()
    pos = torch.arange(t)[None]
    cos, sin = dca_rope(pos, inv_freq, dca)
    q3, k_rot = dca_apply_rope(q, k, cos, sin)
    # the cache: `pad` invalid slots (garbage keys) then the tokens; slot positions 0 for padding
    junk = torch.randn(1, pad, 2, 8, dtype=torch.float64)
    k_cache, v_cache = torch.cat([junk, k_rot], 1), torch.cat([junk, v], 1)
    k_pos = torch.cat([torch.zeros(1, pad, dtype=torch.long), pos], 1)
    valid = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, t, dtype=torch.bool)], 1)
    steps = [(0, prompt)] + [(n, n + 1) for n in range(prompt, t)]
    for a, e in steps:
        got = dca_attention_positions(q3[:, a:e], k_cache[:, :pad + e], v_cache[:, :pad + e],
                                      pos[:, a:e], k_pos[:, :pad + e], valid[:, :pad + e], None, dca)
        want = _dca(q[:, :e], k[:, :e], v[:, :e], dca, inv_freq)[:, a:e]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_prefill_step_equals_the_per_pair_path():
    """A KV-cache prefill (empty cache, left-padded rows) takes the chunk loop per row; its valid
    rows equal the per-pair (decode) path."""
    from types import SimpleNamespace

    dca = DCAConfig(12, 4, 6)
    b, t = 2, 40
    q, k, v = _qkv(b, t, 4, 2, 8, seed=6, dtype=torch.float64)
    pad = torch.tensor([0, 13])
    slot = torch.arange(t)[None]
    valid, pos = slot >= pad[:, None], (slot - pad[:, None]).clamp(min=0)
    cos, sin = dca_rope(pos, rope_inv_freq(8, 100.0).double(), dca)
    q3, k_rot = dca_apply_rope(q, k, cos, sin)
    step = SimpleNamespace(q_positions_BT=pos, k_positions_BS=pos, k_valid_BS=valid,
                           q_slots=torch.arange(t), start=0)
    got = dca_attention(q3, k_rot, v, step, dca=dca)
    want = dca_attention_positions(q3, k_rot, v, pos, pos, valid, None, dca)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-10, atol=1e-10)


def test_dca_settings_are_validated():
    with pytest.raises(ValueError, match="local_size"):
        DCAConfig(8, 8)
    with pytest.raises(ValueError, match="variant"):
        DCAConfig(8, 2, variant="chunkllama")
    with pytest.raises(ValueError, match="dca_variant"):
        get_config("debug", dca_chunk_size=8, dca_local_size=2, dca_variant="x")
    plain, _ = _models(chunk=40, local=8)
    with pytest.raises(ValueError, match="DCA tables"):  # DCA attention ops need the DCA rope tables
        build_model(plain.cfg, dataclasses.replace(
            KernelOps(), apply_rope=dca_apply_rope))(torch.zeros(1, 4, dtype=torch.long))


def test_megaqwen_eval_runs_dca_and_yarn(tmp_path, capsys):
    """`megaqwen-eval loss --dca C W [--dca-original N]` scores with DCA (equal to the DCA model's own
    loss), `--yarn` with YaRN, and refuses both together (vLLM ignores rope_scaling under DCA)."""
    import json

    from megaqwen.eval import main as eval_main
    from megaqwen.train.checkpoint import save_checkpoint

    plain, _ = _models(chunk=40, local=8)
    _, dca_t = _models(chunk=40, local=8, orig=16)
    save_checkpoint(tmp_path / "ckpt", 1, plain, None,
                    {"consumed_samples": 0, "model_config": dataclasses.replace(
                        plain.cfg, dca_chunk_size=0, dca_local_size=0).to_dict()})
    ids = torch.randint(0, 1024, (71,), generator=torch.Generator().manual_seed(2))
    (tmp_path / "d.jsonl").write_text(json.dumps({"input_ids": ids.tolist()}))

    def run(*flags, rc=0):
        assert eval_main(["loss", "--checkpoint", str(tmp_path / "ckpt"), "--data",
                          str(tmp_path / "d.jsonl"), "--max-len", "70", "--device", "cpu", *flags]) == rc
        out = capsys.readouterr()
        return json.loads(out.out)["loss"] if rc == 0 else out.err

    with torch.no_grad():
        parts = dca_t(ids[None, :-1], labels=ids[None, 1:])
    assert abs(run("--dca", "40", "8", "--dca-original", "16") - (parts.sum / parts.count).item()) <= 1e-5
    assert abs(run() - run("--dca", "40", "8")) > 1e-4
    assert abs(run("--dca", "40", "8") - run("--dca", "40", "8", "--dca-original", "16")) > 1e-4
    assert abs(run("--yarn", "4", "--yarn-original", "16") - run()) > 1e-4
    assert "--dca-original" in run("--yarn", "4", "--dca", "40", "8", rc=2)
