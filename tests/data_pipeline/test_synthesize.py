"""The synthesize stage end to end with a tiny random Qwen2 that really generates (transformers) and the
tiny judge that really scores: provenance, the score threshold, the synthetic share cap at annotate,
and resuming after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.io import read_documents
from megaqwen.data_pipeline.pipeline import run_stage
from megaqwen.data_pipeline.synthesize import (
    LocalGenerator,
    _pair_key,
    build_scorer,
    messages_for,
    sampling_seed,
    synthesize_task,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from megaqwen.data_pipeline.tiny_judge import save_tiny_judge

    return save_tiny_judge(tmp_path_factory.mktemp("tiny") / "qwen2")


def _cfg(tmp_path: Path, tiny: Path, min_score: float = 0.0) -> PipelineConfig:
    docs = []
    for line in (REPO / "data_pipeline/samples/corpus.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["id"].startswith("doc-") and len(rec["text"]) > 400:
            docs.append({"id": rec["id"], "text": rec["text"]})
        if len(docs) == 3:
            break
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in docs) + "\n", encoding="utf-8")
    cfg = PipelineConfig()
    cfg.input.paths = [str(tmp_path / "docs.jsonl")]
    cfg.output_dir = str(tmp_path / "out")
    cfg.steps = [{"name": "normalize"}]
    cfg.domains.backend, cfg.domains.student = "embedding", False
    cfg.scorer.max_length = 32
    cfg.remix.tokenizer = str(tiny)  # the saved Qwen2.5 tokenizer (loads faster than building it)
    s = cfg.synthesize
    s.enabled, s.templates, s.seeds_per_task, s.min_score = True, ["qa", "textbook"], 2, min_score
    s.generator.model, s.generator.max_new_tokens, s.generator.temperature = str(tiny), 24, 1.0
    s.generator.max_seed_chars = 300
    s.scorer.backend, s.scorer.model, s.scorer.dimensions, s.scorer.max_doc_chars = (
        "local",
        str(tiny),
        ["safety"],
        300,
    )
    cfg.validate()
    return cfg


def _synthetic(cfg: PipelineConfig) -> list:
    return list(read_documents(cfg.out / "synthetic" / "00000.jsonl.zst"))


def test_a_tiny_model_generates_a_judge_filters_provenance_and_the_cap_hold(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny)
    for stage in ("filter", "dedup", "synthesize"):
        run_stage(cfg, stage, progress=False)
    syn = _synthetic(cfg)
    assert len(syn) == 4  # 2 seeds x 2 templates, threshold 0: all kept (no duplicate among them)
    assert len({d.text for d in syn}) == 4
    # each text is what transformers' own generate samples for that prompt and seed, and each score
    # what the judge gives it: the model really ran
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)
    judge = build_scorer(cfg)
    seeds = {d.id: d for d in read_documents(cfg.out / "filtered" / "00000.jsonl.zst")}
    for d in syn[:2]:
        m = d.metadata
        assert m["source"] == "synthetic" and m["generator"] == tiny.name
        assert m["prompt_template"] in ("qa", "textbook") and m["seed_id"] in seeds
        msgs = messages_for(m["prompt_template"], seeds[m["seed_id"]].text, 300)
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        torch.manual_seed(sampling_seed(0, _pair_key(m["seed_id"], m["prompt_template"])))
        out = model.generate(
            **ids, max_new_tokens=24, do_sample=True, temperature=1.0, top_p=0.95, top_k=None
        )
        assert d.text == tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert m["synthetic_score"] == pytest.approx(judge.score([d.text])[0].scores["overall"], abs=1e-4)
    # the threshold: rerun at the median score keeps exactly those at or above it (re-filtering the
    # logged generations: nothing is generated again)
    scores = sorted(d.metadata["synthetic_score"] for d in syn)
    cfg.synthesize.min_score = scores[2]
    run_stage(cfg, "synthesize", progress=False, rerun=True)
    kept = _synthetic(cfg)
    assert sorted(d.metadata["synthetic_score"] for d in kept) == [x for x in scores if x >= scores[2]]
    assert len(kept) < len(syn)
    # the cap: at most 30% of a domain's tokens synthetic, in the annotated output
    cfg.remix.synthetic_max_share = 0.3
    run_stage(cfg, "annotate", progress=False)
    real, synth = {}, {}
    for p in (cfg.out / "annotated").rglob("*.jsonl.zst"):
        for d in read_documents(p):
            side = synth if d.metadata.get("source") == "synthetic" else real
            side[d.metadata["domain"]] = side.get(d.metadata["domain"], 0) + d.metadata["tokens"]
    for dom, n in synth.items():
        assert n / (n + real.get(dom, 0)) <= 0.3, (dom, n, real.get(dom))
    marker = json.loads(next((cfg.out / "markers" / "annotate").glob("*.json")).read_text())
    cap_step = next(s for s in marker["steps"] if s["name"] == "synthetic_cap")
    assert cap_step["seen"] == len(kept)
    assert cap_step["kept"] == sum(
        d.metadata.get("source") == "synthetic"
        for p in (cfg.out / "annotated").rglob("*.jsonl.zst")
        for d in read_documents(p)
    )
    assert sum(marker["synthetic_tokens"].values()) == sum(synth.values())
    # the report: language x domain x content type x source counts and the synthetic share
    from megaqwen.data_pipeline.report import write_report

    write_report(cfg)
    stats = json.loads((cfg.out / "stats.json").read_text())
    rows = stats["composition"]
    assert sum(r["tokens"] for r in rows if r["source"] == "synthetic") == sum(synth.values())
    assert sum(r["documents"] for r in rows if r["source"] == "corpus") == 3
    assert all(v <= 0.3 for v in stats["synthetic_share"]["by_domain"].values())
    (syn_step,) = stats["steps"]["synthesize"]  # the rerun's generations, below the threshold removed
    assert syn_step["seen"] == 4 and syn_step["kept"] == len(kept)
    assert "Synthetic share" in (cfg.out / "report" / "report.md").read_text()


def test_the_stage_resumes_after_a_kill_without_generating_again(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Explain photosynthesis.", "id": "p1"}\n')
    cfg.synthesize.prompts = str(tmp_path / "prompts.jsonl")
    for stage in ("filter", "dedup"):
        run_stage(cfg, stage, progress=False)
    real = LocalGenerator(cfg.synthesize.generator, cfg.synthesize.seed)
    calls = []

    class Killed(Exception):
        pass

    class Dying:
        name = real.name

        def __init__(self, die_after: int | None):
            self.die_after = die_after

        def generate(self, messages, key):
            if self.die_after is not None and len(calls) == self.die_after:
                raise Killed
            calls.append(key)
            return real.generate(messages, key)

    scorer = build_scorer(cfg)
    log_path = cfg.out / "synthetic" / "00000.generations.jsonl"
    with pytest.raises(Killed):
        synthesize_task(cfg, 0, Dying(die_after=2), scorer)
    assert not (cfg.out / "synthetic" / "00000.jsonl.zst").exists()
    before = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert len(before) == 2
    with open(log_path, "a") as f:  # the kill also cut a line short
        f.write('{"key": "')
    resumed = synthesize_task(cfg, 0, Dying(die_after=None), scorer)
    assert len(calls) == 5 and len(set(calls)) == 5  # 2 before the kill, the 3 left after it
    assert resumed["steps"][0]["seen"] == 5  # 2 seeds x 2 templates + 1 prompt
    after = {(r["seed_id"], r["template"]): r for r in map(json.loads, log_path.read_text().splitlines())}
    assert len(after) == 5 and all(after[(r["seed_id"], r["template"])] == r for r in before)
    syn = _synthetic(cfg)
    assert {d.text for d in syn} == {r["text"] for r in after.values()}
    assert [d.metadata["seed_id"] for d in syn if d.metadata["prompt_template"] == "prompt"] == ["p1"]
    # a malformed prompt line is named
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:2"):
        synthesize_task(cfg, 0, Dying(die_after=None), scorer)
