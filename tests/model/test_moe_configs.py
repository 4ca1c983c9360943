"""Qwen2-MoE configs: published parameter counts (total / active), the assumed Qwen2.5-Turbo."""

import pytest

from megaqwen.models import get_config, model_names
from megaqwen.models.spec import get_spec
from megaqwen.parallel.dims import ParallelDims

# name: (total, active) parameters in billions
TOTAL_ACTIVE = {
    "qwen1.5-moe-a2.7b": (14.3, 2.7),  # model card: 14.3B total, 2.7B activated
    "qwen2-57b-a14b": (57.4, 14.2),  # model card: 57.4B total (57B), 14.2B activated (A14B)
    "qwen2.5-turbo": (52.8, 6.5),  # our assumption (conf/model/qwen2.5-turbo.yaml says why)
}


@pytest.mark.parametrize("name", TOTAL_ACTIVE)
def test_total_and_active_parameters(name):
    cfg = get_config(name)
    assert (round(cfg.num_params() / 1e9, 1), round(cfg.active_params() / 1e9, 1)) == TOTAL_ACTIVE[name]


def test_every_qwen2_moe_config_has_its_counts():
    moe = {n for n in model_names() if get_config(n).arch == "qwen2_moe" and not n.startswith("debug")}
    assert moe == set(TOTAL_ACTIVE)


def test_turbo_is_a_qwen2_moe_config_with_a_1m_context():
    cfg = get_config("qwen2.5-turbo")
    assert cfg.arch == "qwen2_moe" and cfg.rope_theta == 1e7 and cfg.max_position_embeddings == 1_010_000
    # (the closed-form count equals a built model's: test_moe.py checks that on the published sizes;
    # building Turbo's 10,752 expert modules, even on meta, costs ~6 s)
    assert get_spec(cfg).validate(cfg, ParallelDims(world_size=64, ep=8)) == []  # 128 experts: ep 8 fits
    assert "num_experts=128 is not divisible by ep=3" in get_spec(cfg).validate(cfg, ParallelDims(6, ep=3))[0]


def test_assumed_configs_are_listed_as_choices():
    assert "qwen2.5-turbo" in model_names()
    with pytest.raises(ValueError, match="qwen2.5-turbo"):
        get_config("qwen2.5-plus")
