"""ParallelDims arithmetic and validation: bad layouts fail up front, naming the numbers."""

from __future__ import annotations

import pytest

from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.dims import ParallelDims, padded_vocab_size, resolve_backend


def test_dp_is_inferred_from_world_size():
    assert ParallelDims(world_size=8, tp=2).dp == 4
    assert ParallelDims(world_size=8, tp=2, pp=2).dp == 2
    assert ParallelDims.from_config(ParallelConfig(tp=4), world_size=8).dp == 2


@pytest.mark.parametrize("kw, msg", [
    (dict(world_size=6, tp=4), "world_size=6 is not divisible by tp*pp*cp=4*1*1=4"),
    (dict(world_size=8, tp=2, dp=2), "dp*tp*pp*cp = 2*2*1*1 = 4 != world_size=8"),
    (dict(world_size=4, tp=0), "parallel.tp must be >= 1, got 0"),
    (dict(world_size=4, dp=4, ep=3), "ep=3 must divide dp*cp=4*1=4"),
])
def test_world_size_mismatch_names_the_numbers(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("*", r"\*")):
        ParallelDims(**kw)


def test_model_that_does_not_split_names_every_offending_value():
    cfg = get_config("qwen2.5-0.5b")  # 14 heads, 2 KV heads, vocab 151,936, 24 layers
    dims = ParallelDims(world_size=8, tp=4, pp=2)
    with pytest.raises(ValueError) as e:
        dims.validate_model(cfg, cfg.spec)
    text = str(e.value)
    assert "num_heads=14 is not divisible by tp=4" in text
    assert "qwen2.5-0.5b" in text and "tp=4 pp=2" in text
    with pytest.raises(ValueError, match="num_layers=24 is fewer than pp=32 pipeline ranks"):
        ParallelDims(world_size=32, pp=32).validate_model(cfg, cfg.spec)


def test_kv_heads_split_or_replicated():
    cfg = get_config("qwen2.5-1.5b")  # 12 heads, 2 KV heads
    ParallelDims(world_size=4, tp=4).validate_model(cfg, cfg.spec)  # KV heads replicated x2
    assert ParallelDims(world_size=4, tp=4).kv_replicas(cfg.num_kv_heads) == 2
    assert ParallelDims(world_size=2, tp=2).kv_replicas(cfg.num_kv_heads) == 1
    bad = get_config("debug", num_heads=6, num_kv_heads=3, hidden_size=96)
    with pytest.raises(ValueError, match="num_kv_heads=3 and tp=2"):
        ParallelDims(world_size=2, tp=2).validate_model(bad, bad.spec)


def test_vocab_must_be_padded_to_tp():
    cfg = get_config("debug", vocab_size=1001)
    with pytest.raises(ValueError, match="vocab_size=1001 is not a multiple of tp=4; pad it to 1004"):
        ParallelDims(world_size=4, tp=4).validate_model(cfg, cfg.spec)
    assert padded_vocab_size(151_665, 128) == 151_680 and padded_vocab_size(1024, 4) == 1024


def test_sequence_parallel_needs_divisible_seq_len():
    with pytest.raises(ValueError, match="seq_len=30 is not divisible by tp=4"):
        ParallelDims(world_size=4, tp=4).validate_model(get_config("debug"), get_spec("qwen2"), seq_len=30,
                                                        sequence_parallel=True)


def test_backend_choice():
    assert resolve_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match=r"^parallel.backend='mpi' is not one of auto \| nccl \| gloo$"):
        resolve_backend("mpi")
    with pytest.raises(ValueError, match=r"parallel.backend='ncl' .* \(did you mean nccl\?\)"):
        resolve_backend("ncl")
