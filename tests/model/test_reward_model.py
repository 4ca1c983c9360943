"""The score head (`model.head=score`, a reward model): its parameters and config rules, the pipeline
split, and the Hugging Face export as `*ForSequenceClassification` — transformers' pooled logits equal
our rewards, and HF -> megaqwen -> HF is bit-exact."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from megaqwen.convert.cli import main as convert_main
from megaqwen.convert.hf import load_pretrained
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.train.reward import rewards
from tests.convert.test_hf_convert import hf_tensors
from tests.hf_random import randomise_

PAD = 0  # the test vocabulary's pad id (Qwen's 151643, the default, is outside a 263-id vocabulary)


def _cfg(name="debug", **kw):
    return replace(get_config(name), vocab_size=263, head="score", tie_word_embeddings=False,
                   pad_token_id=PAD, **kw)


def test_score_head_replaces_the_lm_head_and_is_counted():
    cfg = _cfg()
    model = get_spec(cfg).build(cfg, seed=0)
    names = dict(model.named_parameters())
    assert names["score.weight"].shape == (1, cfg.hidden_size)
    assert not any(n.startswith("lm_head") for n in names)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    shapes = get_spec(cfg).param_shapes(cfg, tp=2)
    assert [s.name for s in shapes.last] == ["model.norm.weight", "score.weight"]  # whole on every rank
    with pytest.raises(ValueError, match="head=score has no LM head to tie"):
        replace(get_config("debug"), head="score")
    with pytest.raises(ValueError, match="head='value'; choose lm | score"):
        replace(get_config("debug"), head="value", tie_word_embeddings=False)


def test_pipeline_split_puts_the_score_head_on_the_last_stage():
    cfg = _cfg(num_layers=4)
    spec = get_spec(cfg)
    first, last = (spec.build(cfg, device="meta") for _ in range(2))
    spec.pipeline.prune(first, {0, 1}, first=True, last=False)
    spec.pipeline.prune(last, {2, 3}, first=False, last=True)
    assert first.score is None and first.model.norm is None
    assert last.score is not None and last.model.embed_tokens is None
    assert spec.pipeline.boundary_modules(last, False, True)["head"] is last.score
    assert spec.pipeline.shared_params(last) == []


def _padded_rows(lengths: list[int], t: int, vocab: int) -> torch.Tensor:
    """(B, t) right-padded rows of `lengths` real tokens (ids >= 1, pad 0)."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.full((len(lengths), t), PAD)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(1, vocab, (n,), generator=g)
    return tokens


@pytest.mark.parametrize("name,hf_cls", [("debug", "Qwen2ForSequenceClassification"),
                                         ("debug-qwen3", "Qwen3ForSequenceClassification"),
                                         ("debug-moe", "Qwen2MoeForSequenceClassification"),
                                         ("debug-qwen3-moe", "Qwen3MoeForSequenceClassification")])
def test_export_loads_as_sequence_classifier_with_our_rewards(tmp_path, name, hf_cls):
    """Our checkpoint -> HF folder: config.json names the sequence classifier (one label, the pad
    id), transformers loads it strictly and its pooled logits (last non-pad token) equal our rewards
    (fp32, <= 1e-5); importing that folder back gives bit-identical tensors."""
    import transformers

    cfg = _cfg(name)
    model = randomise_(get_spec(cfg).build(cfg, seed=0))
    _save(model, cfg, tmp_path / "native")
    assert convert_main(["to-hf", str(tmp_path / "native"), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == [hf_cls]
    assert len(conf["id2label"]) == 1 and conf["pad_token_id"] == PAD  # num_labels=1
    assert conf["tie_word_embeddings"] is False
    hf, info = getattr(transformers, hf_cls).from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                             output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    tokens = _padded_rows([11, 7, 16, 9], t=16, vocab=cfg.vocab_size)
    with torch.no_grad():
        ref = hf.eval()(tokens).logits[:, 0]  # (B,) HF pools each row's last non-pad token
        pos, _ = model.prepare_inputs(tokens, None, None)
        got = rewards(model, model.hidden_states(tokens, pos), {"tokens": tokens, "cp_group": None})
    assert (got - ref).abs().max().item() <= 1e-5, (got, ref)
    assert got.std() > 1e-3  # the rows' rewards differ: a wrong token would show

    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_pretrained(tmp_path / "back")
    assert (back.cfg.head, back.cfg.tie_word_embeddings, back.cfg.pad_token_id) == ("score", False, PAD)
    a, b = model.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert convert_main(["to-hf", str(tmp_path / "back"), str(tmp_path / "hf2"), "--no-tokenizer"]) == 0
    x, y = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "hf2")
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def _save(model, cfg, out):
    """A native checkpoint folder of `model` (step 0), through the HF importer's own writer."""
    import torch.distributed.checkpoint as dcp

    from megaqwen.parallel.checkpoint_folder import FORMAT

    out.mkdir(parents=True)
    dcp.save({"model": {k: v.contiguous() for k, v in model.state_dict().items()}}, checkpoint_id=str(out))
    (out / "meta.json").write_text(json.dumps({"format": FORMAT, "step": 0, "consumed_samples": 0,
                                               "model_config": cfg.to_dict()}))


def test_a_classifier_with_several_labels_is_refused():
    from megaqwen.models.qwen2.hf_adapter import config_to_hf, head_from_hf

    hf = config_to_hf(_cfg(), torch.float32)
    assert head_from_hf(hf) == {"head": "score", "tie_word_embeddings": False, "pad_token_id": PAD}
    with pytest.raises(ValueError, match="num_labels=3 is not supported"):
        head_from_hf({**hf, "num_labels": 3})


@pytest.mark.parametrize("tied", [True, False])
def test_to_reward_keeps_the_lm_body_and_adds_a_score_head(tmp_path, tied):
    """`megaqwen-convert to-reward`: an HF language model -> a head=score checkpoint whose body is the
    LM's bit for bit (same hidden states), without lm_head, with a fresh score head; it refuses a
    reward model."""
    from tests.convert.test_hf_convert import save_random_hf

    save_random_hf(tmp_path / "lm", tied, dtype=torch.float32)
    assert convert_main(["to-reward", str(tmp_path / "lm"), str(tmp_path / "rm"), "--seed", "3"]) == 0
    lm, rm = load_pretrained(tmp_path / "lm"), load_pretrained(tmp_path / "rm")
    assert rm.cfg.head == "score" and not rm.cfg.tie_word_embeddings and rm.lm_head is None
    a, b = lm.state_dict(), rm.state_dict()
    assert set(b) - set(a) == {"score.weight"} and all(torch.equal(a[k], b[k]) for k in b if k in a)
    assert 0.005 < b["score.weight"].std().item() < 0.05  # Normal(0, init_std = 0.02)
    x = torch.randint(0, 263, (2, 9))
    pos, _ = lm.prepare_inputs(x, None, None)
    assert torch.equal(lm.hidden_states(x, pos), rm.hidden_states(x, pos))
    assert rm(x).shape == (2, 9, 1)  # per-token scores, HF's logits
    assert convert_main(["to-reward", str(tmp_path / "rm"), str(tmp_path / "rm2")]) == 2
