"""Data-mix proportions per blend source for the run record: `mix/<name>` = share of a step's samples.

A blend (`megaqwen.data.blend`) fixes which source every sample index comes from, so the shares of
any step follow from its sample range alone, identically on every rank and with no communication.
Samples are packed to seq_len tokens, so a source's share of samples is also its share of tokens.
A source is named by its shard's file name (`shards/web` -> `web`; the data pipeline writes one
shard per domain, `shards/<domain>`); repeated names get `_<k>` with k the recipe position.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from megaqwen.data.blend import BlendedDataset, BlendRecipe, load_blend_recipe, make_recipe


def source_names(source: str | Path | list[str] | BlendRecipe) -> list[str]:
    """One name per blend source, in the recipe's order (the order `build_dataset` blends them)."""
    if isinstance(source, BlendRecipe):
        prefixes = list(source.prefixes)
    elif isinstance(source, (str, Path)) and str(source).endswith(".json"):
        prefixes = list(load_blend_recipe(source).prefixes)
    elif isinstance(source, (str, Path)):
        prefixes = [str(source)]
    else:
        prefixes = list(make_recipe(list(source)).prefixes)
    names = [Path(p).name for p in prefixes]
    repeated = {n for n, c in Counter(names).items() if c > 1}
    return [f"{n}_{k}" if n in repeated else n for k, n in enumerate(names)]


def mix_counts(dataset: BlendedDataset, first: int, count: int) -> list[int]:
    """Samples [first, first + count) of the blend, counted per source."""
    out = [0] * len(dataset.datasets)
    for i in range(first, first + count):
        out[dataset.locate(i)[0]] += 1
    return out


def mix_metrics(dataset, first: int, count: int, names: list[str]) -> dict[str, float]:
    """{"mix/<name>": share of samples [first, first + count) drawn from that source}; {} unless
    `dataset` is a blend of several sources (one source is always 1.0, nothing to plot)."""
    if not isinstance(dataset, BlendedDataset) or count <= 0:
        return {}
    if len(names) != len(dataset.datasets):
        raise ValueError(f"{len(names)} names {names} for a blend of {len(dataset.datasets)} sources; "
                         "pass source_names() of the same data.path the dataset was built from")
    return {f"mix/{n}": c / count for n, c in zip(names, mix_counts(dataset, first, count))}


class MixMeter:
    """Per-step mix of the training stream: `step(consumed_samples, global_batch_size)` after each
    optimizer step gives the shares of the global batch that step read."""

    def __init__(self, dataset, source):
        self.dataset = dataset
        self.names = source_names(source) if isinstance(dataset, BlendedDataset) else []

    def step(self, consumed_samples: int, global_batch_size: int) -> dict[str, float]:
        return mix_metrics(self.dataset, consumed_samples - global_batch_size, global_batch_size, self.names)
