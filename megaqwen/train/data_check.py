"""`data.path` / `data.valid_path` checked before any model is built, with the command that fixes it.

Accepted: a shard prefix (PREFIX.bin + PREFIX.idx), a blend recipe (*.json) whose prefixes all
exist, or `sample` (the shipped corpus, tokenised on first use). Anything else names what was looked
for and how to make it: `megaqwen-data tokenize`.
"""

from __future__ import annotations

from pathlib import Path

from megaqwen.data.indexed import bin_path, exists, idx_path
from megaqwen.train.errors import UsageError, did_you_mean

SAMPLE = "sample"
TOKENIZE = "megaqwen-data tokenize --input 'FILES' --output-prefix {prefix}"


def shard_prefixes(path: str, out_dir: str | Path) -> list[str]:
    """The shard prefixes `path` names (`sample`: where the run tokenises the shipped corpus)."""
    if path == SAMPLE:
        return [str(Path(out_dir) / "data" / SAMPLE)]
    if path.endswith(".json"):
        from megaqwen.data.blend import load_blend_recipe

        return list(load_blend_recipe(path).prefixes)
    return [path]


def check_data_path(key: str, path: str, out_dir: str | Path) -> None:
    """UsageError unless `path` (the value of config `key`) names shards that exist."""
    if path == SAMPLE:
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
