"""Published configs: parameter counts equal the official checkpoints; YAML twins agree; bad configs fail."""

from pathlib import Path

import pytest
import yaml

from megaqwen.models import PUBLISHED, ModelConfig, build_model, get_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"

# Total parameters of the official Hugging Face safetensors checkpoints (Qwen/Qwen2.5-*).
OFFICIAL_PARAMS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
}


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_meta_model_has_official_parameter_count(name):
    cfg = get_config(name)
    model = build_model(cfg, device="meta")
    counted = sum(p.numel() for p in model.parameters())
    assert counted == OFFICIAL_PARAMS[name]
    assert cfg.num_params() == counted


def test_every_published_size_has_a_config():
    assert set(PUBLISHED) == set(OFFICIAL_PARAMS)


@pytest.mark.parametrize("name", ["debug", *OFFICIAL_PARAMS])
def test_yaml_matches_dataclass(name):
    data = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert ModelConfig(**data) == get_config(name)


def test_padded_vocab_differs_between_small_and_large():
    assert get_config("qwen2.5-3b").vocab_size == 151_936
    assert get_config("qwen2.5-7b").vocab_size == 152_064


@pytest.mark.parametrize("kw, match", [
    (dict(num_heads=4, num_kv_heads=3), "num_heads=4 is not divisible by num_kv_heads=3"),
    (dict(hidden_size=66, num_heads=4, num_kv_heads=2), "hidden_size=66 is not divisible by num_heads=4"),
    (dict(num_layers=0), "num_layers must be positive"),
    (dict(hidden_size=60, num_heads=4, num_kv_heads=2, head_dim=15), "head_dim=15 must be even"),
])
def test_bad_config_names_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'qwen2.5-9b'"):
        get_config("qwen2.5-9b")


def test_flops_per_token_counts_head_and_attention():
    cfg = get_config("qwen2.5-7b")
    dense = 6 * (cfg.num_params(include_embedding=False) + cfg.vocab_size * cfg.hidden_size)
    attn = 6 * cfg.num_layers * 4096 * cfg.hidden_size
    assert cfg.flops_per_token(4096) == dense + attn
