"""Model configs: every conf/model YAML is a valid config; parameter counts equal the official
checkpoints; the YAML reading rule; bad configs fail."""

import pytest
import torch

from megaqwen.models import ModelConfig, build_model, get_config, model_names
from megaqwen.models import config as model_config
from megaqwen.models.spec import get_spec

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


def test_every_qwen25_config_has_its_official_count():
    dense = {n for n in model_names() if n.startswith("qwen2.5-") and get_config(n).arch == "qwen2"}
    assert dense == set(OFFICIAL_PARAMS)


def test_every_family_brings_its_published_counts():
    """Each architecture's published sizes are checked against outside numbers in its own test file
    (here; test_moe_configs.py; test_qwen3.py): a config of a new architecture needs its own."""
    assert {get_config(n).arch for n in model_names()} == {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}


@pytest.mark.parametrize("name", model_names())
def test_every_yaml_is_a_valid_config_that_round_trips_through_hf(name):
    """Each conf/model file loads (ModelConfig validates it), names a registered architecture, and
    reads back from the config.json we would export (what train.init_from compares)."""
    cfg = get_config(name)
    assert cfg.name == name
    adapter = get_spec(cfg).hf
    assert adapter.config_from_hf(adapter.config_to_hf(cfg, torch.bfloat16), name=name) == cfg
    if cfg.is_moe:
        assert cfg.active_params() < cfg.num_params()
    else:
        assert cfg.active_params() == cfg.num_params()


@pytest.mark.parametrize("name", model_names())
def test_trainer_composes_the_same_config(name):
    """`megaqwen-train model=NAME` (Hydra over the schema) and get_config(NAME) read one file one way."""
    from megaqwen.train.config import register_configs
    from megaqwen.train.preflight import compose_config

    register_configs()  # what importing megaqwen.train.main does
    composed = compose_config([f"model={name}"]).model
    assert composed == get_config(name) and composed.to_dict() == get_config(name).to_dict()
    overridden = compose_config([f"model={name}", "model.num_layers=4", "model.rope_theta=5e5"]).model
    assert overridden == get_config(name, num_layers=4, rope_theta=5e5)


def test_yaml_is_read_as_hydra_reads_it(tmp_path, monkeypatch):
    """Keys merge onto the ModelConfig defaults with Hydra's typing; the rest are errors naming the file."""
    monkeypatch.setattr(model_config, "_model_files", lambda: tmp_path)
    model_config._read.cache_clear()
    (tmp_path / "tiny.yaml").write_text("name: tiny\nrope_theta: 1000000  # an int\nrms_norm_eps: 1e-5\n"
                                        "num_layers: 3\n")
    (tmp_path / "hydra-keys.yaml").write_text("defaults:\n  - debug\nname: hydra-keys\n")
    (tmp_path / "renamed.yaml").write_text("name: other\n")
    (tmp_path / "badtype.yaml").write_text("name: badtype\nnum_layers: two\n")
    (tmp_path / "broken.yaml").write_text("name: broken\nmlp_only_layers: [0\n")
    try:
        cfg = get_config("tiny", hidden_size=32)
        assert cfg == ModelConfig(name="tiny", rope_theta=1e6, rms_norm_eps=1e-5, num_layers=3,
                                  hidden_size=32)
        assert type(cfg.rope_theta) is float and type(cfg.rms_norm_eps) is float
        with pytest.raises(ValueError, match=r"conf/model/hydra-keys.yaml: defaults: Key 'defaults' not in "
                                             r".*only ModelConfig fields"):
            get_config("hydra-keys")
        with pytest.raises(ValueError, match=r"conf/model/renamed.yaml says name: 'other'"):
            get_config("renamed")
        with pytest.raises(ValueError, match=r"conf/model/badtype.yaml: num_layers: Value 'two'"):
            get_config("badtype")
        with pytest.raises(ValueError, match=r"conf/model/broken.yaml: not YAML"):
            get_config("broken")
        assert model_names() == ["badtype", "broken", "hydra-keys", "renamed", "tiny"]
    finally:
        model_config._read.cache_clear()


def test_get_config_returns_a_fresh_object():
    a = get_config("debug-moe")
    a.mlp_only_layers.append(3)
    a.num_layers = 9
    assert get_config("debug-moe").mlp_only_layers == [0] and get_config("debug-moe").num_layers == 4


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


def test_unknown_model_name_suggests_the_closest_and_lists_the_yaml_files():
    with pytest.raises(ValueError, match=r"unknown model 'qwen2.5-9b' \(did you mean qwen2.5-7b") as e:
        get_config("qwen2.5-9b")
    assert all(n in str(e.value) for n in model_names())


def test_flops_per_token_counts_head_and_attention():
    cfg = get_config("qwen2.5-7b")
    dense = 6 * (cfg.num_params(include_embedding=False) + cfg.vocab_size * cfg.hidden_size)
    attn = 6 * cfg.num_layers * 4096 * cfg.hidden_size
    assert cfg.flops_per_token(4096) == dense + attn
