"""DCA and YaRN settings through HF config.json both ways: every field survives export -> config.json
(vLLM's `dual_chunk_attention_config` spelling) -> import, transformers reads the file, vLLM's
optional sparse keys are read with a warning, unknown keys and the paper variant are refused."""

import dataclasses
import json
import logging

import pytest
import torch
from transformers import AutoConfig

from megaqwen.convert.cli import main as convert_main
from megaqwen.convert.hf import load_pretrained
from megaqwen.models import build_model
from megaqwen.models.config import get_config
from megaqwen.models.qwen2.hf_adapter import config_from_hf, config_to_hf
from megaqwen.train.checkpoint import save_checkpoint

LONG = dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_position=256,
            rope_beta_fast=16.0, rope_beta_slow=2.0, rope_attention_factor=1.2, dca_chunk_size=512,
            dca_local_size=64, dca_original_max_position=384, max_position_embeddings=4096)


def test_export_import_round_trip_keeps_every_dca_and_yarn_field(tmp_path):
    cfg = get_config("debug", vocab_size=128, **LONG)
    model = build_model(dataclasses.replace(cfg, dca_chunk_size=0, dca_local_size=0,
                                            dca_original_max_position=0), seed=0)
    save_checkpoint(tmp_path / "ckpt", 1, model, None, {"consumed_samples": 0, "model_config": cfg.to_dict()})
    assert convert_main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    # vLLM's keys: its DCA runs these positions and this temperature (and ignores rope_scaling)
    assert written["dual_chunk_attention_config"] == {"chunk_size": 512, "local_size": 64,
                                                      "original_max_position_embeddings": 384}
    rs = written["rope_scaling"]
    assert (rs["type"], rs["factor"], rs["original_max_position_embeddings"], rs["beta_fast"],
            rs["beta_slow"], rs["attention_factor"]) == ("yarn", 4.0, 256, 16.0, 2.0, 1.2)
    read = AutoConfig.from_pretrained(tmp_path / "hf")  # transformers reads the file as written
    assert read.dual_chunk_attention_config == written["dual_chunk_attention_config"]
    assert (getattr(read, "rope_parameters", None) or read.rope_scaling)["factor"] == 4.0
    back = config_from_hf(written)
    assert dataclasses.replace(back, name=cfg.name) == cfg
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    assert dataclasses.replace(load_pretrained(tmp_path / "native").cfg, name=cfg.name) == cfg


def test_temperature_off_is_written_as_vllm_default():
    """No original_max_position_embeddings key unless the temperature is on: vLLM switches it on
    for any value > 0 (megaqwen once wrote the trained length here and ran without it)."""
    cfg = get_config("debug", dca_chunk_size=64, dca_local_size=8)
    assert config_to_hf(cfg, torch.float32)["dual_chunk_attention_config"] == {"chunk_size": 64,
                                                                               "local_size": 8}
    assert config_from_hf(config_to_hf(cfg, torch.float32)).dca_original_max_position == 0


def test_vllm_sparse_keys_warn_unknown_keys_and_paper_variant_refuse(caplog):
    hf = config_to_hf(get_config("debug", dca_chunk_size=64, dca_local_size=8), torch.float32)
    hf["dual_chunk_attention_config"].update(sparse_attention_enabled=True, sparse_attention_threshold=32768)
    with caplog.at_level(logging.WARNING):
        assert config_from_hf(hf).dca_chunk_size == 64
    assert "sparse_attention_enabled" in caplog.text and "dense DCA" in caplog.text
    hf["dual_chunk_attention_config"]["chunk_overlap"] = 3
    with pytest.raises(ValueError, match="chunk_overlap"):
        config_from_hf(hf)
    with pytest.raises(ValueError, match="dca_variant='paper'"):
        config_to_hf(get_config("debug", dca_chunk_size=64, dca_local_size=8, dca_variant="paper"),
                     torch.float32)
