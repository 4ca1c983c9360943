"""The LLM judge as the domain classifier at annotate time, end to end with the tiny judge.

Each annotated document's domain must be the option whose letter the judge most likely answers
next, and its domain_score that probability (renormalised over the option letters), recomputed here
from a plain unbatched forward pass of the saved judge model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.io import read_documents
from megaqwen.data_pipeline.judge.rubric import domain_letters, domain_messages
from megaqwen.data_pipeline.pipeline import run_stage

REPO = Path(__file__).resolve().parents[2]


def _docs(path: Path, n: int) -> list[dict]:
    """n decent sample documents, one per domain hint as far as possible."""
    seen, out = set(), []
    for line in (REPO / "data_pipeline/samples/corpus.jsonl").read_text(encoding="utf-8").splitlines():
        if '"id": "doc-' not in line:
            continue
        rec = json.loads(line)
        if rec.get("domain_hint") not in seen and len(rec["text"]) > 400:
            seen.add(rec.get("domain_hint"))
            out.append(rec)
        if len(out) == n:
            break
    path.write_text("\n".join(json.dumps(r) for r in out) + "\n", encoding="utf-8")
    return out


def _judge_domain_probs(model_dir: Path, taxonomy: dict[str, str], max_chars: int):
    """text -> {domain: P(letter) / sum over letters} from one unpadded forward of the saved judge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    letters = [tok.encode(c, add_special_tokens=False)[0] for c in domain_letters(len(taxonomy))]

    def probs(text: str) -> dict[str, float]:
        prompt = tok.apply_chat_template(
            domain_messages(text, taxonomy, max_chars), tokenize=False, add_generation_prompt=True
        )
        with torch.no_grad():
            ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
            logits_V = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        p = torch.softmax(logits_V.double(), -1)[letters]
        return dict(zip(taxonomy, (p / p.sum()).tolist()))

    return probs


def _content_sensitive_judge(out: Path, texts: list[str], taxonomy: dict[str, str], max_chars: int) -> Path:
    """The tiny random judge answers the same letter for every document (its last hidden state is
    dominated by the shared prompt suffix). Give it an untied output head whose letter rows point
    along the document-specific part of those hidden states, so different documents get different
    domains, and save it with the Qwen2.5 tokenizer like `megaqwen-data tiny-judge` does."""
    from megaqwen.data_pipeline.tiny_judge import build_tiny_qwen2
    from megaqwen.tokenizer import load_tokenizer

    tok, m = load_tokenizer(), build_tiny_qwen2(seed=0)
    letters = [tok.encode(c, add_special_tokens=False)[0] for c in domain_letters(len(taxonomy))]
    with torch.no_grad():
        h_ND = torch.stack([
            m.model(input_ids=torch.tensor([tok.encode(tok.apply_chat_template(
                domain_messages(t, taxonomy, max_chars), tokenize=False, add_generation_prompt=True
            ), add_special_tokens=False)])).last_hidden_state[0, -1]
            for t in texts
        ])  # fmt: skip
        c_ND = h_ND - h_ND.mean(0)
        head_VD = m.model.embed_tokens.weight.detach().clone()
        for k in range(len(texts)):  # document k's own direction on every second letter
            head_VD[letters[(2 * k) % len(letters)]] = 8 * c_ND[k] / c_ND[k].norm() ** 2
        m.lm_head.weight = torch.nn.Parameter(head_VD)
        m.config.tie_word_embeddings = False
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_annotate_domains_come_from_judge_next_token_probabilities(tmp_path: Path):
    docs = _docs(tmp_path / "docs.jsonl", 6)
    assert len(docs) == 6
    cfg = PipelineConfig()
    cfg.input.paths = [str(tmp_path / "docs.jsonl")]
    cfg.output_dir = str(tmp_path / "out")
    cfg.steps = [{"name": "normalize"}]
    judge_dir = _content_sensitive_judge(
        tmp_path / "judge", [r["text"] for r in docs], cfg.domains.taxonomy, max_chars=400
    )
    cfg.judge.backend, cfg.judge.model = "local", str(judge_dir)
    cfg.judge.dimensions, cfg.judge.max_doc_chars, cfg.judge.sample_size = ["safety"], 400, 6
    cfg.scorer.max_length = 32
    cfg.domains.backend = "judge"
    cfg.validate()
    for stage in ("filter", "dedup", "judge", "train_scorer", "annotate"):
        run_stage(cfg, stage, progress=False)
    annotated = {d.id: d for p in (cfg.out / "annotated").rglob("*.jsonl.zst") for d in read_documents(p)}
    assert sorted(annotated) == sorted(r["id"] for r in docs)
    judge_probs = _judge_domain_probs(judge_dir, cfg.domains.taxonomy, 400)
    picked = set()
    for rec in docs:
        d = annotated[rec["id"]]
        want = judge_probs(d.text)
        best = max(want, key=want.get)
        assert d.metadata["domain"] == best, (
            rec["id"],
            d.metadata,
            sorted(want.items(), key=lambda kv: -kv[1])[:3],
        )
        assert d.metadata["domain_score"] == pytest.approx(want[best], abs=1e-4)
        # the file a document is written to is its judge domain
        assert (cfg.out / "annotated" / best / "00000.jsonl.zst").is_file()
        picked.add(best)
    assert len(picked) >= 3, picked  # the judge really tells the documents apart
    # the judge stage's labels carry the same distribution (batched there, unbatched here)
    labels = [json.loads(x) for x in (cfg.out / "judge" / "00000.jsonl").read_text().splitlines()]
    for r in labels:
        want = judge_probs(r["text"])
        assert r["domain_probs"] == pytest.approx(want, abs=1e-5)
