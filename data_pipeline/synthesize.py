"""The `synthesize` stage: seed documents -> new documents through an LLM, kept when a judge likes them.

As the Qwen2 report's synthetic pretraining data (Qwen2-72B-Instruct / Qwen2-Math-72B-Instruct
generating, reward models filtering), per input part (one task each, after dedup):

1. seeds: the `synthesize.seeds_per_task` deduplicated documents with the smallest id hash (a fixed,
   spread sample), each paired with every template of `synthesize.templates` that fits its content
   type (`TEMPLATES`: Q&A and textbook rewrites of prose, maths problems with worked solutions,
   code exercises); and the prompts of `synthesize.prompts` (a jsonl file, sent as they are, in
   task 0; `prompt_template` "prompt");
2. generate: the generator backend (`generator.backend`): "local" = a transformers causal LM (the
   judge's loader and chat template; sampling seeded per seed x template, so a rerun writes the
   same text), "openai" = an OpenAI-compatible chat server (vLLM, SGLang);
3. score: the quality judge (`judge/`: the `synthesize.scorer` JudgeConfig, else the pipeline's
   `judge`) rates each generation; kept when its `min_score_dimension` score is >= `min_score`;
4. dedup: dropped when its exact key (`steps/dedup.exact_key`, as the filter stage's) is one of the
   corpus's (`signatures/*.npz`) or of an earlier generation, or when its MinHash signature
   estimates a Jaccard similarity >= `dedup.threshold` with its seed (a copied seed);
5. provenance: `metadata.source = "synthetic"`, `generator`, `prompt_template`, `seed_id`,
   `synthetic_score`; written to `synthetic/<task>.jsonl.zst` for the annotate stage, which labels
   them like the corpus and caps their token share per domain (`remix.synthetic_max_share`).

Resumable: each generation (kept or not) is appended to `synthetic/<task>.generations.jsonl` as
soon as it is scored, with a key of what made it (`generation_key`); a rerun after a kill, or with
another `min_score`, reuses the pairs found there under the same key and generates only the rest;
the final file is written atomically. Counts per removal reason go into the task marker (the report's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from megaqwen.data_pipeline.config import GeneratorConfig, PipelineConfig, SynthesizeConfig
from megaqwen.data_pipeline.document import Document, StepStats

log = logging.getLogger("megaqwen.data_pipeline")

# name -> (content types of the seeds it applies to, content type of its output, user prompt)
TEMPLATES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "qa": (
        ("prose",),
        "prose",
        "Rewrite the following text as a set of questions and detailed answers that teach its content. "
        "Write in the language of the text.\n\nText:\n{text}",
    ),
    "textbook": (
        ("prose",),
        "prose",
        "Rewrite the following text as a clear textbook section with a title, explanations and an "
        "example. Write in the language of the text.\n\nText:\n{text}",
    ),
    "math_problems": (
        ("math", "prose"),
        "math",
        "Write three maths problems inspired by the following text, each followed by a worked, "
        "step-by-step solution with the final answer.\n\nText:\n{text}",
    ),
    "code_exercises": (
        ("code",),
        "code",
        "Write a programming exercise based on the following code, then a complete solution in the same "
        "language with tests, and explain it.\n\nCode:\n{text}",
    ),
}
PROMPT_TEMPLATE = "prompt"  # a line of `synthesize.prompts`: its text is the user message as it is


# ---------------------------------------------------------------- generators
def sampling_seed(seed: int, key: int) -> int:
    """The torch seed of one seed x template pair (a rerun samples the same text)."""
    return (seed * 1_000_003 + key) % 2**31


class LocalGenerator:
    """A transformers causal LM: chat template, left-padded batches, seeded sampling per request."""

    def __init__(self, g: GeneratorConfig, seed: int = 0):
        from megaqwen.data_pipeline.judge.backends import LocalBackend, load_chat_tokenizer

        tok = load_chat_tokenizer(g.tokenizer, g.model)
        backend = LocalBackend(g.model, tokenizer=tok, device=g.device, dtype=g.dtype, batch_size=1)
        self.model, self.tokenizer, self.g, self.seed = backend.model, backend.tokenizer, g, seed
        self.name = Path(g.model).name

    def generate(self, messages: list[dict[str, str]], key: int) -> str:
        import torch

        from megaqwen.data_pipeline.judge.backends import render

        ids = self.tokenizer(render(self.tokenizer, messages), return_tensors="pt").to(self.model.device)
        torch.manual_seed(sampling_seed(self.seed, key))
        sample = self.g.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                **ids,
                max_new_tokens=self.g.max_new_tokens,
                do_sample=sample,
                temperature=self.g.temperature if sample else None,
                top_p=self.g.top_p if sample else None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


class OpenAIGenerator:
    """An OpenAI-compatible chat completions server (vLLM, SGLang): the judge's HTTP client."""

    def __init__(self, g: GeneratorConfig, seed: int = 0):
        from megaqwen.data_pipeline.judge.backends import OpenAIBackend

        if not g.base_url:
            raise ValueError("synthesize.generator.base_url is empty (e.g. http://localhost:8000/v1)")
        self.http = OpenAIBackend(g.base_url, g.model, "top_logprobs", 1, None, 1, g.timeout_s, g.api_key_env)
        self.g, self.seed, self.name = g, seed, g.model

    def generate(self, messages: list[dict[str, str]], key: int) -> str:
        r = self.http._post(
            "chat/completions",
            {
                "model": self.g.model,
                "messages": messages,
                "max_tokens": self.g.max_new_tokens,
                "temperature": self.g.temperature,
                "top_p": self.g.top_p,
                "seed": sampling_seed(self.seed, key),
            },
        )
        try:
            return r["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"{self.g.base_url}/chat/completions: unexpected reply {str(r)[:300]}") from e


def build_generator(s: SynthesizeConfig):
    return (LocalGenerator if s.generator.backend == "local" else OpenAIGenerator)(s.generator, s.seed)


def build_scorer(cfg: PipelineConfig):
    from megaqwen.data_pipeline.stages import _judge_for

    jc = cfg.synthesize.scorer if cfg.synthesize.scorer.backend != "none" else cfg.judge
    if jc.backend == "none":
        raise ValueError(
            "the synthesize stage scores every generation: set synthesize.scorer or judge "
            "(backend local / openai)"
        )
    import dataclasses

    return _judge_for(json.dumps(dataclasses.asdict(jc), sort_keys=True))


# ---------------------------------------------------------------- the stage
def messages_for(template: str, text: str, max_chars: int) -> list[dict[str, str]]:
    user = text if template == PROMPT_TEMPLATE else TEMPLATES[template][2].format(text=text[:max_chars])
    return [
        {"role": "system", "content": "You write high-quality educational documents."},
        {"role": "user", "content": user},
    ]


def read_prompts(path: str) -> list[Document]:
    """`synthesize.prompts`: jsonl lines {"prompt": ..., "id"?: ..., "content_type"?: ...}
    (`megaqwen.data.prompts.read_prompt_records`: a bad line is an error naming the file and line)."""
    from megaqwen.data.prompts import read_prompt_records

    out = []
    for p in read_prompt_records(path):
        rec = p.record
        if "prompt" not in rec:
            raise ValueError(f"{p.where}: the synthesize stage takes `prompt` lines (the text becomes the "
                             "user turn after the stage's own system turn), not `messages`")
        ct = rec.get("content_type", "prose")
        out.append(Document(str(rec.get("id", f"prompt-{p.line}")), rec["prompt"], {"content_type": ct}))
    return out


def _seeds(cfg: PipelineConfig, task: int) -> list[Document]:
    from megaqwen.data_pipeline.stages import _deduped, _sample_key

    docs = sorted(_deduped(cfg, task), key=lambda d: (_sample_key(d.id), d.id))
    return docs[: cfg.synthesize.seeds_per_task]


def corpus_exact_keys(cfg: PipelineConfig) -> set[int]:
    """Exact keys of every filtered document (the filter stage's `signatures/*.npz`)."""
    keys: set[int] = set()
    for p in sorted((cfg.out / "signatures").glob("*.npz")):
        with np.load(p) as z:
            keys.update(int(k) for k in z["exact"])
    return keys


def generation_key(cfg: PipelineConfig) -> str:
    """What a logged generation depends on: the generator, the templates' text, the scorer, the seed
    (not `min_score`: a new threshold re-filters the logged generations without generating again)."""
    import dataclasses
    import hashlib

    s = cfg.synthesize
    scorer = s.scorer if s.scorer.backend != "none" else cfg.judge
    blob = json.dumps(
        [dataclasses.asdict(s.generator), TEMPLATES, dataclasses.asdict(scorer), s.seed], sort_keys=True
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _text_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _pair_key(seed_id: str, template: str) -> int:
    from megaqwen.data_pipeline.stages import _sample_key

    return _sample_key(f"{seed_id}\x00{template}") % 2**31


def synthesize_task(cfg: PipelineConfig, task: int, generator=None, scorer=None) -> dict[str, Any]:
    from megaqwen.data_pipeline.io import write_lines
    from megaqwen.data_pipeline.steps.dedup import Signer, exact_key

    s = cfg.synthesize
    out_dir = cfg.out / "synthetic"
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{task:05d}.jsonl.zst"
    log_path = out_dir / f"{task:05d}.generations.jsonl"
    gkey = generation_key(cfg)
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if log_path.is_file():
        with open(log_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short: generated again
                    continue
                if rec.get("key") == gkey:  # made by this generator, prompt and scorer
                    done[(rec["seed_id"], rec["template"])] = rec
        # keep only the reusable records (a changed generator starts the log afresh)
        with open(log_path.with_name(log_path.name + ".tmp"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values())
        log_path.with_name(log_path.name + ".tmp").replace(log_path)
    stats = StepStats("synthesize")
    todo = [
        (seed, t)
        for seed in _seeds(cfg, task)
        for t in s.templates
        if seed.metadata.get("content_type", "prose") in TEMPLATES[t][0]
    ]
    if s.prompts and task == 0:  # the prompt file's generations belong to the first task
        todo += [(doc, PROMPT_TEMPLATE) for doc in read_prompts(s.prompts)]
    need = [
        (seed, t) for seed, t in todo if done.get((seed.id, t), {}).get("seed_hash") != _text_hash(seed.text)
    ]
    if need:
        generator = generator if generator is not None else build_generator(s)
        scorer = scorer if scorer is not None else build_scorer(cfg)
    gen_name = getattr(generator, "name", s.generator.model) if generator is not None else s.generator.model
    with open(log_path, "a", encoding="utf-8") as f:
        for i, (seed, t) in enumerate(need):
            msgs = messages_for(t, seed.text, s.generator.max_seed_chars)
            text = generator.generate(msgs, _pair_key(seed.id, t))
            j = scorer.score([text])[0].scores if text.strip() else {}
            if j and s.min_score_dimension not in j:
                raise ValueError(
                    f"synthesize.min_score_dimension {s.min_score_dimension!r} is not one of {sorted(j)}"
                )
            rec = {"key": gkey, "seed_id": seed.id, "seed_hash": _text_hash(seed.text), "template": t}
            rec.update(text=text, scores=j)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            done[(seed.id, t)] = rec
            if (i + 1) % 10 == 0:
                log.info("synthesize task %d: %d/%d generations", task, i + 1, len(need))
    corpus_keys = corpus_exact_keys(cfg)
    signer = Signer(cfg.dedup)
    kept_docs: list[str] = []
    for seed, t in todo:
        rec = done[(seed.id, t)]
        stats.seen += 1
        text = rec["text"]
        if not text.strip():
            stats.remove("synthesize:empty")
            continue
        score = float(rec["scores"][s.min_score_dimension])
        if score < s.min_score:
            stats.remove(f"synthesize:score_below_{s.min_score}")
            continue
        key = exact_key(text)
        if key in corpus_keys:
            stats.remove("synthesize:exact_duplicate")
            continue
        if float(np.mean(signer.signature(text) == signer.signature(seed.text))) >= cfg.dedup.threshold:
            stats.remove("synthesize:near_duplicate_of_seed")
            continue
        corpus_keys.add(key)
        stats.kept += 1
        meta = {
            "source": "synthetic",
            "generator": gen_name,
            "prompt_template": t,
            "seed_id": seed.id,
            "synthetic_score": round(score, 4),
            "content_type": seed.metadata.get("content_type", "prose")
            if t == PROMPT_TEMPLATE
            else TEMPLATES[t][1],
        }
        if "language" in seed.metadata:
            meta["language"] = seed.metadata["language"]
        doc = Document(f"synthetic/{t}/{seed.id}", text, meta)
        kept_docs.append(json.dumps(doc.to_json(), ensure_ascii=False))
    write_lines(final, kept_docs)
    return {"task": task, "generator": gen_name, "kept": stats.kept, "steps": [stats.to_json()]}


def read_synthetic(cfg: PipelineConfig, task: int) -> list[Document]:
    """The synthesize stage's documents of `task` (none when the stage is off)."""
    from megaqwen.data_pipeline.io import read_documents

    if not cfg.synthesize.enabled:
        return []
    p = cfg.out / "synthetic" / f"{task:05d}.jsonl.zst"
    if not p.is_file():
        raise RuntimeError(f"{p} is missing: run the synthesize stage first")
    return list(read_documents(p))


def is_synthetic(doc: Document) -> bool:
    return doc.metadata.get("source") == "synthetic"
