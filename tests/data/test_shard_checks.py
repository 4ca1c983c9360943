"""The trainer's pre-flight reads what a shard records (PREFIX.shard.json): shards of another tokenizer
than the model's and token ids >= model.vocab_size are refused before any model is built, naming both
sides; Megatron shards without the sidecar still load, their ids read from the .bin."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import megaqwen.train.main  # noqa: F401  (registers the config schema in Hydra's ConfigStore)
from megaqwen.data import indexed
from megaqwen.data.indexed import IndexedDataset, IndexedDatasetBuilder, max_token_id, meta_path, read_meta
from megaqwen.data.tokenize import tokenize_files
from megaqwen.models.config import get_config, model_names
from megaqwen.tokenizer import tokenizer_info
from megaqwen.train.data_check import check_recipe, check_shards_for_model
from megaqwen.train.errors import UsageError
from megaqwen.train.preflight import preflight
from tests.data.tiny_tokenizer import SENTENCES, make_tiny_tokenizer

SMALL = ["train.seq_len=32", "train.global_batch_size=2", "train.micro_batch_size=1", "train.steps=1",
         "logger.wandb.enabled=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("raw") / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    return src


@pytest.fixture(scope="module")
def qwen_shard(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("qwen") / "web"
    tokenize_files([corpus], str(prefix))
    return prefix


@pytest.fixture(scope="module")
def tiny_shard(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    folder = make_tiny_tokenizer(root / "tiny-bpe")
    tokenize_files([corpus], str(root / "web"), tokenizer=str(folder))
    return root / "web"


def _preflight(tmp_path, data, *extra):
    return preflight([f"train.out_dir={tmp_path / 'run'}", f"data.path={data}", *SMALL, *extra], world_size=1)


def test_default_tokenizer_shards_are_accepted(tmp_path, qwen_shard):
    run = _preflight(tmp_path, qwen_shard)
    assert run.cfg.data.path == str(qwen_shard)
    # every shipped model config reads them (vocab 151,936 or 152,064 > the max id)
    for name in model_names():
        check_shards_for_model("data.path", str(qwen_shard), get_config(name), tmp_path)


def test_shards_of_another_tokenizer_are_refused_naming_both(tmp_path, tiny_shard):
    made_by = read_meta(tiny_shard)["tokenizer"]
    want = tokenizer_info()
    with pytest.raises(UsageError) as e:
        _preflight(tmp_path, tiny_shard)
    msg = str(e.value)
    assert f"tiny-bpe ({made_by['size']} ids, fingerprint {made_by['fingerprint']}" in msg
    assert f"Qwen2.5 ({want.size} ids, fingerprint {want.fingerprint}" in msg
    assert f"data.path={tiny_shard}" in msg and "--output-prefix" in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()  # refused before any work
    recipe = tmp_path / "mix.json"  # a blend recipe: every shard it names is checked
    recipe.write_text(json.dumps({"name": "mix", "datasets": [{"prefix": str(tiny_shard), "weight": 1}]}))
    want_msg = f"data.valid_path={recipe}: shard {tiny_shard} was tokenised with tiny-bpe"
    with pytest.raises(UsageError, match=re.escape(want_msg)):
        check_shards_for_model("data.valid_path", str(recipe), get_config("qwen2.5-7b"), tmp_path)


def test_ids_past_the_vocabulary_are_refused_naming_max_id(tmp_path, qwen_shard):
    top = max(int(IndexedDataset(qwen_shard)[i].max()) for i in range(len(IndexedDataset(qwen_shard))))
    vocab = top  # one short: the largest id would index past the embedding table
    with pytest.raises(UsageError, match=rf"holds token id {top} \(recorded in web.shard.json\) but "
                                         rf"model.vocab_size={vocab} "):
        _preflight(tmp_path, qwen_shard, f"model.vocab_size={vocab}")


def test_megatron_shard_without_sidecar_is_read(tmp_path):
    """No sidecar (Megatron's tools): no tokenizer check, ids scanned; a bad sidecar is named."""
    prefix = tmp_path / "megatron"
    with IndexedDatasetBuilder(prefix) as b:
        b.add_document([5, 7, 151_935])
        b.add_document([1, 151_936, 2])
    meta_path(prefix).unlink()
    assert max_token_id(prefix) == (151_936, "read all 6 tokens")
    with pytest.raises(UsageError, match=r"id 151936 \(read all 6 tokens\) but model.vocab_size=151936"):
        _preflight(tmp_path, prefix)
    check_shards_for_model("data.path", str(prefix), get_config("qwen2.5-14b"), tmp_path)  # 152,064 rows
    meta_path(prefix).write_text("{not json")
    with pytest.raises(UsageError, match=r"megatron.shard.json: not valid JSON .*delete the file"):
        check_shards_for_model("data.path", str(prefix), get_config("qwen2.5-14b"), tmp_path)


def test_large_shard_without_sidecar_is_sampled(tmp_path, monkeypatch):
    prefix = tmp_path / "big"
    tokens = np.arange(1000, dtype=np.int32) % 100
    tokens[995] = 500  # inside the last window
    with IndexedDatasetBuilder(prefix) as b:
        b.add_document(tokens)
    meta_path(prefix).unlink()
    monkeypatch.setattr(indexed, "FULL_SCAN_TOKENS", 100)
    monkeypatch.setattr(indexed, "SAMPLE_WINDOWS", 4)
    monkeypatch.setattr(indexed, "SAMPLE_WINDOW_TOKENS", 10)
    top, how = max_token_id(prefix)
    assert top == 500 and how.startswith("read 40 of 1,000 tokens in 4 windows")


def test_sidecar_is_replaced_with_its_shard(tmp_path):
    prefix = tmp_path / "s"
    with IndexedDatasetBuilder(prefix, meta={"tokenizer": None}) as b:
        b.add_document([3, 9])
    assert read_meta(prefix) == {"format": 1, "tokenizer": None, "dtype": "int32", "num_documents": 1,
                                 "num_tokens": 2, "min_token_id": 3, "max_token_id": 9}
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(prefix) as b:  # a crash keeps the old pair
        b.add_document([4])
        raise RuntimeError("crash")
    assert read_meta(prefix)["max_token_id"] == 9 and sorted(p.name for p in tmp_path.iterdir()) == [
        "s.bin", "s.idx", "s.shard.json"]
    with IndexedDatasetBuilder(prefix) as b:
        b.add_document([4, 1])
    assert (read_meta(prefix)["min_token_id"], read_meta(prefix)["max_token_id"]) == (1, 4)


def test_recipe_message_names_the_plain_run_fix(tmp_path):
    recipe = tmp_path / "stage-32k.json"
    recipe.write_text(json.dumps({"sources": []}))
    (tmp_path / "stage-32k.meta.json").write_text(json.dumps({"seq_length": 32768, "rope_base": 1e6}))
    with pytest.raises(ValueError) as e:
        check_recipe(str(recipe), 4096, 1e4)
    assert "pass train.seq_len=32768 model.rope_theta=1000000.0" in str(e.value)
