"""`data.path` / `data.valid_path` checked before any model is built, with the command that fixes it.

Accepted: a shard prefix (PREFIX.bin + PREFIX.idx), a blend recipe (*.json) whose prefixes all
exist, or `sample` (the shipped corpus, tokenised on first use). Anything else names what was looked
for and how to make it: `megaqwen-data tokenize`.

Then `check_shards_for_model` (pre-flight, after the paths exist): shards whose PREFIX.shard.json names
another tokenizer than the model's are refused naming both, and so is any token id >= model.vocab_size
(it would index past the embedding table: an IndexError on CPU, a device-side assert on GPU, mid-run).

`check_recipe`: a blend recipe's plan (`<recipe>.meta.json`) must match the run's seq_len and RoPE
base (pre-flight and every stage of a chain).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from megaqwen.data.indexed import (
    IndexedDataset,
    bin_path,
    exists,
    idx_path,
    max_token_id,
    meta_path,
    read_meta,
)
from megaqwen.models.config import ModelConfig
from megaqwen.tokenizer import TokenizerInfo, tokenizer_info
from megaqwen.train.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    from megaqwen.train.config import Config

SAMPLE = "sample"
SHIPPED_CHAT = {"arithmetic-sft": ("arithmetic_sft.jsonl", "sft"),
                "arithmetic-dpo": ("arithmetic_pairs.jsonl", "dpo"),
                "chat-sft": ("chat.jsonl", "sft"), "chat-dpo": ("preferences.jsonl", "dpo")}
"""`data.path=sample:NAME`: a toy chat set shipped in data_pipeline/samples (file, --format), tokenised by
the run into out_dir/data/NAME on first use, like `sample` (the stage chains use them: debug-grpo)."""
TOKENIZE = "megaqwen-data tokenize --input 'FILES' --output-prefix {prefix}"

log = logging.getLogger(__name__)


def is_sample(path: str) -> bool:
    """`sample` or `sample:NAME`: shipped data the run tokenises itself."""
    return path == SAMPLE or path.startswith(SAMPLE + ":")


def sample_prefix(path: str, out_dir: str | Path) -> Path:
    """Where the run tokenises `sample` / `sample:NAME` (out_dir/data/sample, out_dir/data/NAME)."""
    return Path(out_dir) / "data" / (SAMPLE if path == SAMPLE else path.split(":", 1)[1])


def shard_prefixes(path: str, out_dir: str | Path) -> list[str]:
    """The shard prefixes `path` names (`sample`: where the run tokenises the shipped corpus)."""
    if is_sample(path):
        return [str(sample_prefix(path, out_dir))]
    if path.endswith(".json"):
        from megaqwen.data.blend import load_blend_recipe

        return list(load_blend_recipe(path).prefixes)
    return [path]


def check_data_path(key: str, path: str, out_dir: str | Path) -> None:
    """UsageError unless `path` (the value of config `key`) names shards that exist."""
    if path == SAMPLE:
        return
    if is_sample(path):
        name = path.split(":", 1)[1]
        if name not in SHIPPED_CHAT:
            raise UsageError(f"{key}={path}: no shipped data set {name!r}; shipped: sample, "
                             + ", ".join(f"sample:{n}" for n in SHIPPED_CHAT))
        return
    p = Path(path)
    if path.endswith(".json"):
        if not p.is_file():
            raise UsageError(f"{key}={path}: blend recipe not found ({p.resolve()})")
        try:
            prefixes = shard_prefixes(path, out_dir)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"{key}={path}: {e}") from e
        missing = [q for q in prefixes if not exists(q)]
        if missing:
            raise UsageError(f"{key}={path}: the recipe names shard(s) that do not exist: "
                             f"{', '.join(missing)}; make them with " + TOKENIZE.format(prefix=missing[0]))
        return
    if exists(p):
        return
    if p.suffix in (".bin", ".idx") and exists(p.with_suffix("")):
        raise UsageError(f"{key}={path}: give the shard prefix without extension: "
                         f"{key}={p.with_suffix('')}")
    if p.suffix in (".jsonl", ".json", ".parquet", ".gz", ".zst") or p.is_dir():
        raise UsageError(f"{key}={path} is raw data, the trainer reads tokenised shards: "
                         + TOKENIZE.replace("'FILES'", path).format(prefix="shards/NAME")
                         + f", then {key}=shards/NAME")
    have = [str(Path(q.parent, q.stem)) for q in p.parent.glob("*.idx")] if p.parent.is_dir() else []
    raise UsageError(f"{key}={path}: no shard {bin_path(p)} / {idx_path(p)} "
                     f"(looked in {p.parent.resolve()}){did_you_mean(path, have)}; make shards with "
                     + TOKENIZE.format(prefix=path) + f", or use {key}=sample (the shipped corpus)")


def model_tokenizer(model: ModelConfig) -> TokenizerInfo:
    """The tokenizer `model` reads. ModelConfig names none: every registered architecture (Qwen2 /
    Qwen2.5 dense, Qwen2-MoE) is trained on the Qwen BPE, so it is the shipped Qwen2.5 tokenizer. The
    comparison is by fingerprint, so shards made from an official Qwen2/2.5/3 folder match as well."""
    return tokenizer_info(None)


def check_run_shards(cfg: Config) -> None:
    """`check_shards_for_model` and `check_chat_shards` for data.path and data.valid_path (pre-flight,
    once they exist)."""
    for key, path in (("data.path", cfg.data.path), ("data.valid_path", cfg.data.valid_path)):
        if path:
            check_shards_for_model(key, path, cfg.model, cfg.train.out_dir)
            check_chat_shards(key, path, cfg)


def check_chat_shards(key: str, path: str, cfg: Config) -> None:
    """UsageError for sft / dpo shards (`megaqwen.data.chat`) the run would read wrongly: sft packs
    examples, so it needs document masks and position resets; dpo rows come in pairs, so it needs an
    even micro-batch and its shard alone (a blend would split pairs). With train.epochs > 0, the run's
    samples must fit in that many passes over data.path."""
    if path == SAMPLE or (is_sample(path) and not exists(sample_prefix(path, cfg.train.out_dir))):
        return  # the corpus; a shipped chat set the run has not tokenised yet
    from megaqwen.data.dataset import epochs_capacity

    t, d = cfg.train, cfg.data
    prefixes = list(dict.fromkeys(shard_prefixes(path, cfg.train.out_dir)))
    formats = {q: (read_meta(q) or {}).get("data_format", "text") for q in prefixes}
    for prefix, fmt in formats.items():
        if fmt == "sft" and not (d.document_mask and d.reset_position_ids):
            raise UsageError(f"{key}={path}: {prefix} is an sft shard of packed examples; it needs "
                             "data.document_mask=true and data.reset_position_ids=true so that examples "
                             "never attend to each other")
        if fmt == "dpo":
            if len(prefixes) > 1:
                raise UsageError(f"{key}={path}: {prefix} is a dpo shard: its rows are (chosen, rejected) "
                                 f"pairs, so the shard is read alone (not in a blend of {len(prefixes)})")
            from megaqwen.data.pairs import check_pair_rows

            try:
                check_pair_rows(t.micro_batch_size, f"{key}={path}: {prefix} is a dpo shard")
            except ValueError as e:
                raise UsageError(str(e)) from None
    if t.epochs and key == "data.path" and len(prefixes) == 1:
        prefix, fmt = prefixes[0], formats[prefixes[0]]
        ix = IndexedDataset(prefix)
        if fmt == "dpo":
            per_epoch = len(ix) // 2 * 2 * (1 - d.valid_fraction)
            fits = int(t.epochs * per_epoch) // t.global_batch_size
        else:
            fits = epochs_capacity(int(ix.num_tokens * (1 - d.valid_fraction)), t.seq_len,
                                   t.epochs) // t.global_batch_size
        if t.steps > fits:
            raise UsageError(f"train.steps={t.steps} x train.global_batch_size={t.global_batch_size} samples "
                             f"are more than train.epochs={t.epochs} pass(es) over {prefix} hold (about "
                             f"{fits} steps); set train.steps={max(fits, 1)} or raise train.epochs")


def check_shards_for_model(key: str, path: str, model: ModelConfig, out_dir: str | Path) -> None:
    """UsageError when a shard of `path` (the value of config `key`) was made by another tokenizer
    than `model`'s, or holds a token id >= model.vocab_size. Shards without PREFIX.shard.json (made by
    Megatron's tools) have no tokenizer to compare; their ids are read (`max_token_id`)."""
    if is_sample(path):  # tokenised by the run itself, with the model's tokenizer
        return
    try:
        prefixes = list(dict.fromkeys(shard_prefixes(path, out_dir)))
        for prefix in prefixes:
            _check_shard(key, path, prefix, model)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{key}={path}: {e}") from e


def _check_shard(key: str, path: str, prefix: str, model: ModelConfig) -> None:
    meta = read_meta(prefix)
    remake = TOKENIZE.format(prefix=prefix)
    if meta is not None and meta.get("tokenizer"):
        try:
            made_by = TokenizerInfo.from_dict(meta["tokenizer"])
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{key}={path}: {meta_path(prefix)} has a malformed tokenizer record "
                             f"({type(e).__name__}: {e}); re-tokenise: {remake}") from e
        want = model_tokenizer(model)
        if made_by.fingerprint != want.fingerprint:
            raise UsageError(f"{key}={path}: shard {prefix} was tokenised with {made_by.describe()}, but "
                             f"model {model.name} reads {want.describe()}; re-tokenise with the model's "
                             f"tokenizer: {remake} (without --tokenizer)")
    if meta is None:
        dtype = IndexedDataset(prefix).dtype
        if dtype.kind in "iu" and int(np.iinfo(dtype).max) < model.vocab_size:
            return  # e.g. uint16 ids: none can reach the vocabulary size, nothing to read
    top, how = max_token_id(prefix)
    if top is not None and top >= model.vocab_size:
        raise UsageError(f"{key}={path}: shard {prefix} holds token id {top} ({how}) but model.vocab_size="
                         f"{model.vocab_size} (ids 0..{model.vocab_size - 1}); tokenise with the model's "
                         f"tokenizer ({remake}) or give a model with model.vocab_size > {top}")


def check_recipe(data_path: str, seq_len: int, rope_theta: float) -> dict[str, Any] | None:
    """A blend recipe's plan (`<recipe>.meta.json`) must agree with the stage's length and RoPE base;
    returns the plan (None when `data_path` is no recipe or has no plan)."""
    if not data_path.endswith(".json"):
        return None
    plan_path = Path(data_path[:-len(".json")] + ".meta.json")
    if not plan_path.is_file():
        log.info("%s has no plan %s: its seq_length/rope_base are not checked", data_path, plan_path.name)
        return None
    plan = json.loads(plan_path.read_text())
    bad, fix = [], []
    if "seq_length" in plan and int(plan["seq_length"]) != seq_len:
        bad.append(f"seq_length {plan['seq_length']} (the stage trains at {seq_len})")
        fix.append(f"train.seq_len={int(plan['seq_length'])}")
    if "rope_base" in plan and float(plan["rope_base"]) != float(rope_theta):
        bad.append(f"rope_base {plan['rope_base']} (the stage uses {rope_theta})")
        fix.append(f"model.rope_theta={float(plan['rope_base'])}")
    if bad:
        raise ValueError(f"data recipe {data_path} was made for " + " and ".join(bad) + f" ({plan_path}); "
                         f"in a plain run pass {' '.join(fix)}, in a stage chain use the recipe of this "
                         "stage, or change the stage to match it")
    return plan
