"""End to end: the debug model trained on the shipped toy chat set (sft shard, masked labels, packed
with document masks) lowers its held-out assistant-token loss; the pre-flight refuses chat shards the
run would read wrongly."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import megaqwen.train.main  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from megaqwen.data.chat import tokenize_chat
from megaqwen.data.tokenize import shipped_sample_corpus
from megaqwen.train.data_check import check_run_shards
from megaqwen.train.errors import UsageError


@pytest.fixture(scope="module")
def chat_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    samples = shipped_sample_corpus().parent
    tokenize_chat([str(samples / "chat.jsonl")], str(out / "chat"))
    tokenize_chat([str(samples / "preferences.jsonl")], str(out / "prefs"), "dpo")
    return str(out / "chat"), str(out / "prefs")


def _config(out_dir, data_path, *overrides):
    base = [f"train.out_dir={out_dir}", f"data.path={data_path}", "model=debug", "train.seq_len=64",
            "train.global_batch_size=4", "train.micro_batch_size=4", "train.steps=16", "train.save_every=0",
            "train.warmup_steps=2", "train.lr=5e-3", "train.eval_every=8", "train.eval_iters=2",
            "data.valid_fraction=0.1", "logger.wandb.enabled=false", "train.device=cpu"]
    with initialize_config_module("megaqwen.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=base + list(overrides)))
    cfg.validate()
    return cfg


def _rows(out_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, chat_shards):
    from megaqwen.train.loop import train

    out = tmp_path_factory.mktemp("sft")
    cfg = _config(out, chat_shards[0], "train.objective=sft")
    check_run_shards(cfg)
    train(cfg)
    return out


@pytest.mark.slow
def test_debug_sft_on_the_toy_chat_set_lowers_held_out_assistant_loss(sft_run):
    rows = _rows(sft_run)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    print("held-out assistant loss", val, "step_time_s", rows[-1]["step_time_s"])
    assert len(val) == 2 and val[-1] < val[0] - 0.3, val
    first = [r for r in rows if "val_loss" in r][0]
    assert first["val_tokens"] < 2 * 4 * 64 // 2  # only assistant tokens are scored


@pytest.mark.slow
def test_dpo_from_the_sft_checkpoint_on_the_toy_preferences(tmp_path, sft_run, chat_shards):
    """The pair rows reach the dpo objective intact: at step 1 policy = reference, so the loss is ln 2;
    after a few passes over 4 pairs the policy prefers their chosen answers."""
    from megaqwen.train.loop import train

    four = tmp_path / "four.jsonl"
    four.write_text("".join((shipped_sample_corpus().parent / "preferences.jsonl").open().readlines()[:4]))
    tokenize_chat([str(four)], str(tmp_path / "four"), "dpo")
    cfg = _config(tmp_path / "run", str(tmp_path / "four"), "train.objective=dpo",
                  f"train.init_from={sft_run}", "train.micro_batch_size=2", "train.steps=10",
                  "train.eval_every=0", "train.lr=1e-2", "data.valid_fraction=0", "train.epochs=5")
    check_run_shards(cfg)
    train(cfg)
    loss = [r["dpo/loss"] for r in _rows(tmp_path / "run")]
    print("dpo loss", loss)
    assert loss[0] == pytest.approx(0.6931, abs=1e-3) and sum(loss[-3:]) / 3 < 0.66, loss


@pytest.mark.parametrize("overrides, match", [
    (("data.document_mask=false",), "document_mask=true"),
    (("train.epochs=1", "train.steps=1000"), "train.epochs=1"),
])
def test_preflight_refuses_misread_sft_shards(tmp_path, chat_shards, overrides, match):
    with pytest.raises(UsageError, match=match):
        check_run_shards(_config(tmp_path, chat_shards[0], *overrides))
    check_run_shards(_config(tmp_path, chat_shards[0], "train.epochs=5"))


def test_preflight_refuses_odd_micro_batch_for_dpo(tmp_path, chat_shards):
    with pytest.raises(UsageError, match="must be even"):
        check_run_shards(_config(tmp_path, chat_shards[1], "train.micro_batch_size=1"))


@pytest.mark.slow
def test_the_sft_checkpoint_exports_and_chats_in_transformers(sft_run, tmp_path):
    """The SFT run exported to HF: transformers loads it with its tokenizer, renders a conversation
    with the shipped chat template and answers greedily with the tokens our model picks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaqwen.convert.cli import main as convert_main
    from megaqwen.convert.hf import load_pretrained

    assert convert_main(["to-hf", str(sft_run), str(tmp_path / "hf")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        answer = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
        ours, x = load_pretrained(sft_run).eval(), ids
        for _ in range(len(answer)):
            x = torch.cat([x, ours(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert len(answer) > 0
    assert torch.equal(x[0, ids.shape[1]:], answer), (tok.decode(answer), tok.decode(x[0]))
