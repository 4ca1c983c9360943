"""`rollout.*`: how an online RL run (`train.objective=grpo`) samples its training rows
(`megaqwen.train.rollout`), and the checks that refuse a config that cannot work, with the fix.

The rollout size follows from the batch: one rollout draws global_batch_size x grpo.updates_per_rollout
/ grpo.group_size prompts from the stream, samples grpo.group_size completions of each, and serves
grpo.updates_per_rollout optimizer steps of global_batch_size rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ENGINES = ("native", "vllm", "hf")
ARITHMETIC = "arithmetic"
"""`rollout.prompts=arithmetic`: the shipped toy prompts (data_pipeline/samples/arithmetic_prompts.jsonl)."""


@dataclass
class RolloutConfig:
    """Online generation for train.objective=grpo: prompts, engine, sampling, saved rollouts."""

    prompts: str = ""
    """Prompt stream: jsonl with `prompt` (str) or `messages` (chat turns) per line, plus the metadata
    the rewards read (e.g. `answer`, `tests`); `arithmetic` = the shipped toy task. Cycled in file
    order; the position is the checkpoint's consumed_samples / grpo.group_size."""
    engine: str = "native"
    """native (the trainer's own model with a KV cache: one process or tp) | vllm (GPU, weights pushed
    after each update) | hf (transformers generate on an export: slow fallback)."""
    temperature: float = 1.0
    """Sampling temperature (> 0: a group of identical greedy completions carries no signal)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1: all)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0: no limit."""
    eval_every: int = 0
    """Evaluate the policy on a fixed prompt set (rollout.eval_prompts) before rollout 0 and every this
    many rollouts, logged as rollout/eval_* on that step (the same prompts and sampling seed each time:
    a curve that does not depend on which prompts a step drew); 0: never."""
    eval_prompts: str = ""
    """The fixed evaluation prompts (jsonl as rollout.prompts; `arithmetic`: the shipped toy task);
    empty: the distinct records of rollout.prompts (all of them are evaluated each time)."""
    eval_samples: int = 4
    """Completions per evaluation prompt sampled as the rollouts sample (temperature, top-p, top-k,
    a fixed seed from train.seed), besides one greedy completion; 0: greedy only."""
    save_every: int = 1
    """Write rollout k's rows (prompt, completion, rewards, advantage) to
    out_dir/rollouts/step_<first step>.jsonl every this many rollouts (rank 0, all dp ranks' rows);
    0 never."""


def shipped_prompts(name: str) -> Path | None:
    """The shipped prompt file `name` stands for (None: `name` is a path)."""
    if name != ARITHMETIC:
        return None
    import importlib.util

    spec = importlib.util.find_spec("megaqwen.data_pipeline")  # located, not imported (layering)
    for d in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(d) / "samples" / "arithmetic_prompts.jsonl"
        if path.is_file():
            return path
    raise FileNotFoundError("rollout.prompts=arithmetic: data_pipeline/samples/arithmetic_prompts.jsonl "
                            "is not installed")


def prompts_path(cfg) -> Path:
    """The prompt file of `cfg.rollout.prompts`; ValueError when unset or missing."""
    name = cfg.rollout.prompts
    if not name:
        raise ValueError("train.objective=grpo needs rollout.prompts: a jsonl of prompts (`prompt` or "
                         "`messages` per line, plus e.g. `answer`), or rollout.prompts=arithmetic (the "
                         "shipped toy task)")
    path = shipped_prompts(name) or Path(name)
    if not path.is_file():
        raise ValueError(f"rollout.prompts={name}: no such file ({path.resolve()})")
    return path


def eval_prompts_path(cfg) -> Path:
    """The fixed evaluation prompt file (rollout.eval_prompts, default rollout.prompts)."""
    name = cfg.rollout.eval_prompts
    if not name:
        return prompts_path(cfg)
    path = shipped_prompts(name) or Path(name)
    if not path.is_file():
        raise ValueError(f"rollout.eval_prompts={name}: no such file ({path.resolve()})")
    return path


def check_rollout(cfg) -> None:
    """ValueError naming the setting and the fix when an online RL run's config cannot work."""
    from megaqwen.suggest import check_choice

    r, t, p = cfg.rollout, cfg.train, cfg.parallel
    check_choice("rollout.engine", r.engine, ENGINES)
    prompts_path(cfg)
    g = cfg.grpo
    if g.max_new_tokens >= t.seq_len:
        raise ValueError(f"grpo.max_new_tokens={g.max_new_tokens} leaves no room for the prompt in "
                         f"train.seq_len={t.seq_len}: a row holds prompt + completion; raise train.seq_len")
    if not r.temperature > 0:
        raise ValueError(f"rollout.temperature={r.temperature}: GRPO samples a group per prompt, and a "
                         "greedy group is G copies of one completion (equal rewards, no signal); use > 0")
    if not 0 < r.top_p <= 1:
        raise ValueError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if r.top_k < 0:
        raise ValueError(f"rollout.top_k must be >= 0 (0: no limit), got {r.top_k}")
    if r.eval_every < 0 or r.eval_samples < 0:
        raise ValueError(f"rollout.eval_every ({r.eval_every}) and rollout.eval_samples ({r.eval_samples}) "
                         "must be >= 0 (eval_every 0: no evaluation; eval_samples 0: greedy only)")
    if r.eval_every:
        eval_prompts_path(cfg)
    if r.save_every < 0:
        raise ValueError(f"rollout.save_every must be >= 0 (0: never), got {r.save_every}")
    if r.engine == "native":
        if p.pp > 1:
            raise ValueError(f"parallel.pp={p.pp}: rollout.engine=native generates with the whole model "
                             "in each process (tp and dp only); use parallel.pp=1 (e.g. tp or dp instead) "
                             "or rollout.engine=vllm")
        if p.cp > 1:
            raise ValueError(f"parallel.cp={p.cp}: rollout.engine=native does not generate under context "
                             "parallelism; use parallel.cp=1 (rollout rows are short) or rollout.engine=vllm")
        if p.sequence_parallel:
            raise ValueError("parallel.sequence_parallel=true: rollout.engine=native decodes one token at "
                             "a time, which sequence parallelism cannot split over tp ranks; set "
                             "parallel.sequence_parallel=false or use rollout.engine=vllm")
    group, updates = g.group_size, g.updates_per_rollout
    rows = t.global_batch_size * updates
    if rows % group:
        raise ValueError(f"train.global_batch_size={t.global_batch_size} x grpo.updates_per_rollout="
                         f"{updates} = {rows} rows per rollout is not a multiple of grpo.group_size={group}"
                         f"; use a global batch that is a multiple of {group}")
