"""MoE configs: published parameter counts (total / active), the assumed Qwen2.5-Turbo, YAML twins."""

from pathlib import Path

import pytest
import yaml

from megaqwen.models import ModelConfig, get_config
from megaqwen.models.config import ASSUMED_MOE
from megaqwen.parallel.expert_parallel import check_expert_parallel

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


@pytest.mark.parametrize("name, total, active", [
    ("qwen1.5-moe-a2.7b", 14.3, 2.7),  # model card: 14.3B total, 2.7B activated
    ("qwen2-57b-a14b", 57.4, 14.2),  # model card: 57.4B total (57B), 14.2B activated (A14B)
    ("qwen2.5-turbo", 52.8, 6.5),  # our assumption (config.py ASSUMED_MOE)
])
def test_total_and_active_parameters(name, total, active):
    cfg = get_config(name)
    assert round(cfg.num_params() / 1e9, 1) == total
    assert round(cfg.active_params() / 1e9, 1) == active


def test_turbo_is_a_qwen2_moe_config_and_its_yaml_agrees():
    cfg = get_config("qwen2.5-turbo")
    assert cfg.arch == "qwen2_moe" and cfg.rope_theta == 1e7 and cfg.max_position_embeddings == 1_010_000
    data = yaml.safe_load((CONF / "qwen2.5-turbo.yaml").read_text())
    assert ModelConfig(**data) == cfg
    # (the closed-form count equals a built model's: test_moe.py checks that on the published sizes;
    # building Turbo's 10,752 expert modules, even on meta, costs ~6 s)
    check_expert_parallel(cfg, 8, 64)  # 128 experts: ep 8 on 64 dp ranks is a valid layout
    with pytest.raises(ValueError, match="num_experts=128 is not divisible by ep=3"):
        check_expert_parallel(cfg, 3, 6)


def test_assumed_configs_are_listed_as_choices():
    assert "qwen2.5-turbo" in ASSUMED_MOE
    with pytest.raises(ValueError, match="qwen2.5-turbo"):
        get_config("qwen2.5-plus")
