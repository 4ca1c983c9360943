"""Blends of shards: recipe files, Megatron-style weighted interleaving, and `build_dataset`.

A recipe is JSON, one per training stage:

    {"name": "stage-4k",
     "datasets": [{"prefix": "shards/tech", "weight": 0.3}, {"prefix": "shards/web", "weight": 0.7}]}

Relative prefixes are resolved against the recipe file's folder; weights are normalised to sum 1.
An optional "description" string is allowed; any other key is an error (a typo such as "wieght"
must not silently fall back to a default).

Sample i of a blend goes to the dataset furthest behind its target share,
argmax_d(weight_d * (i + 1) - count_d) (first d on ties), as Megatron's `build_blending_indices`,
so after any n samples every dataset d has drawn within one sample of weight_d * n (computed
exactly in integers, see `BlendedDataset`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megaqwen.data.dataset import GPTDataset
from megaqwen.data.index_cache import IndexCache, cache_key, load_or_build
from megaqwen.data.indexed import IndexedDataset
from megaqwen.data.pairs import PairDataset

_CHUNK = 1 << 18  # period entries per lazily computed slice of the blend order (~0.15 s each)
_MAX_PERIOD = 1 << 20  # longest blend period: a 10 MB table, filled in at most ~0.6 s


@dataclass(frozen=True)
class BlendRecipe:
    name: str
    """recipe name, logged with the run"""
    prefixes: tuple[str, ...]
    """shard prefixes (PREFIX.bin / PREFIX.idx), absolute or relative to the working directory"""
    weights: tuple[float, ...]
    """sampling weight of each prefix, normalised to sum 1"""
    source: str = "<inline>"
    """the recipe file, for error messages"""


def make_recipe(
    prefixes: list[str], weights: list[float] | None = None, name: str = "inline", source: str = "<inline>"
) -> BlendRecipe:
    if not prefixes:
        raise ValueError(f"blend recipe {source}: no datasets")
    weights = [1.0] * len(prefixes) if weights is None else list(weights)
    if len(weights) != len(prefixes):
        raise ValueError(f"blend recipe {source}: {len(prefixes)} prefixes but {len(weights)} weights")
    for p, w in zip(prefixes, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(
                f"blend recipe {source}: weight of {p} is {w!r}; weights must be finite and >= 0"
            )
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"blend recipe {source}: weights {weights} sum to {total}; need a positive sum")
    return BlendRecipe(name, tuple(str(p) for p in prefixes), tuple(w / total for w in weights), source)


def load_blend_recipe(path: str | Path) -> BlendRecipe:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"blend recipe {path} does not exist")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"blend recipe {path}: invalid JSON ({e})") from e
    if not isinstance(spec, dict):
        raise ValueError(f"blend recipe {path}: expected a JSON object with 'name' and 'datasets'")
    unknown = set(spec) - {"name", "datasets", "description"}
    if unknown:
        raise ValueError(
            f"blend recipe {path}: unknown key(s) {sorted(unknown)}; allowed: name, datasets, description"
        )
    entries = spec.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"blend recipe {path}: 'datasets' must be a non-empty list of {{prefix, weight}}")
    prefixes, weights = [], []
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != {"prefix", "weight"} or not isinstance(e["prefix"], str):
            raise ValueError(
                f"blend recipe {path}: datasets[{k}] is {e!r}; each entry must be exactly "
                f'{{"prefix": str, "weight": number}}'
            )
        p = Path(e["prefix"])
        prefixes.append(str(p if p.is_absolute() else path.parent / p))
        weights.append(e["weight"])
    return make_recipe(prefixes, weights, name=str(spec.get("name", path.stem)), source=str(path))


def rational_weights(weights: list[float], max_period: int = _MAX_PERIOD) -> tuple[list[int], int]:
    """Weights as integers W_d over a common denominator Q <= max_period, sum(W) == Q.

    Decimal-looking weights stay exact (0.3, 0.5, 0.2 -> 3, 5, 2 over 10). Weights with no small
    common denominator are put on a grid of max_period (2**20) by largest remainder, moving each by
    less than 1e-6; a positive weight never rounds to 0.
    """
    fr = [Fraction(w).limit_denominator(10**6) for w in weights]
    total = sum(fr)
    fr = [f / total for f in fr]
    q = math.lcm(*(f.denominator for f in fr))
    if q <= max_period and all(f > 0 for f, w in zip(fr, weights) if w > 0):
        return [int(f * q) for f in fr], q
    exact = [Fraction(w) for w in weights]
    scaled = [f / sum(exact) * max_period for f in exact]
    W = [max(int(x), 1 if x > 0 else 0) for x in scaled]
    by_remainder = sorted(range(len(W)), key=lambda d: (-(scaled[d] - W[d]), d))
    for k in range(max_period - sum(W)):
        W[by_remainder[k % len(W)]] += 1
    while sum(W) > max_period:  # only when tiny weights were raised to 1
        W[W.index(max(W))] -= 1
    return W, max_period


class BlendedDataset(torch.utils.data.Dataset):
    """`num_samples` samples interleaved from `datasets` in the deficit-greedy order of `weights`.

    The greedy runs in exact integers, argmax_d(W_d * (i + 1) - Q * count_d) with the weights as
    W_d / Q, so ties are real ties (first dataset wins) rather than float noise. After Q samples every
    count equals W_d exactly and all deficits are back to their start, so the order repeats with
    period Q: sample i is period entry i % Q, and its index inside its dataset is
    (i // Q) * W_d + (draws of d before i % Q). A recipe of decimal weights (Q = 10, 100, ...) thus
    costs one tiny table, whatever the run length or resume point; Q never exceeds 2**20 (see
    `rational_weights`), and the table is filled lazily in slices of 2**18 entries.
    """

    def __init__(
        self,
        datasets: list[torch.utils.data.Dataset],
        weights: list[float],
        num_samples: int,
        name: str = "blend",
        cache: IndexCache | None = None,
        beside: str | Path = ".",
    ):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{name}: {len(datasets)} datasets but {len(weights)} weights")
        self.datasets, self.num_samples, self.name = datasets, num_samples, name
        self._W, self.period = rational_weights(weights)
        self.weights = [w / self.period for w in self._W]
        for d, (ds, n) in enumerate(zip(datasets, max_draws(weights, num_samples))):
            if len(ds) < n:
                raise ValueError(f"{name}: dataset {d} has {len(ds)} samples, the blend may draw {n}")
        self._counts = [0] * len(datasets)  # draws per dataset over the computed part of the period
        self._dataset_index = np.zeros(0, dtype=np.int16)  # period entry r -> dataset
        self._sample_index = np.zeros(0, dtype=np.int64)  # period entry r -> draws of that dataset before r
        if cache is not None:  # the table of every entry the run reads, built once and memory-mapped
            need = min(self.period, num_samples)

            def build(folder: Path) -> list[str]:
                self._extend(need)
                np.save(folder / "dataset_index.npy", self._dataset_index)
                np.save(folder / "sample_index.npy", self._sample_index)
                return ["dataset_index", "sample_index"]

            key = cache_key(order="blend-1", W=self._W, Q=self.period)
            what = f"{name}: blend of {len(datasets)} over a period of {self.period}"
            arrays = load_or_build(cache, beside, "blend", key, need, need, build, what)
            self._dataset_index, self._sample_index = arrays["dataset_index"], arrays["sample_index"]

    def __len__(self) -> int:
        return self.num_samples

    def _extend(self, upto: int) -> None:
        """Compute period entries [len(computed), upto)."""
        start, W, Q, c = len(self._dataset_index), self._W, self.period, self._counts
        first = list(c)
        ids = []
        for i in range(start, upto):
            t, best = i + 1, 0
            best_deficit = W[0] * t - Q * c[0]
            for d in range(1, len(W)):
                deficit = W[d] * t - Q * c[d]
                if deficit > best_deficit:
                    best, best_deficit = d, deficit
            ids.append(best)
            c[best] += 1
        ds_idx = np.asarray(ids, dtype=np.int16)
        smp_idx = np.zeros(len(ids), dtype=np.int64)
        for d in range(len(W)):
            mask = ds_idx == d
            smp_idx[mask] = first[d] + np.arange(int(mask.sum()))
        self._dataset_index = np.concatenate([self._dataset_index, ds_idx])
        self._sample_index = np.concatenate([self._sample_index, smp_idx])

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset, sample inside it) of blend sample i."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples of {self.name}")
        cycle, r = divmod(i, self.period)
        if r >= len(self._dataset_index):
            self._extend(min(self.period, self.num_samples, (r // _CHUNK + 1) * _CHUNK))
        d = int(self._dataset_index[r])
        return d, cycle * self._W[d] + int(self._sample_index[r])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d, j = self.locate(i)
        return self.datasets[d][j]


def max_draws(weights: list[float], num_samples: int) -> list[int]:
    """Most samples each dataset gives in the first num_samples: the greedy keeps count_d below
    W_d * n / Q + 1, so count_d <= ceil(W_d * n / Q) (exact integer arithmetic)."""
    W, Q = rational_weights(weights)
    return [min(num_samples, -(-w * num_samples // Q)) for w in W]


def build_dataset(
    source: str | Path | list[str] | BlendRecipe,
    seq_len: int,
    num_samples: int,
    seed: int = 1234,
    documents: Callable[[IndexedDataset], Any] | None = None,
    cache: IndexCache | None = None,
    **packing,
) -> torch.utils.data.Dataset:
    """The training dataset: `num_samples` packed samples of `seq_len` tokens.

    `source` is a recipe file (`*.json`), a `BlendRecipe`, one shard prefix, or a list of prefixes
    (equal weights). `documents` maps each shard to the documents to draw from (e.g. one side of
    `holdout.split_documents`); None: all of them. `packing` goes to `GPTDataset` (shuffle, eod_id,
    reset_position_ids, reset_attention_mask, eod_mask_loss, epochs). An sft shard packs with its loss
    mask; a dpo shard (alone, never blended) gives `PairDataset` rows. Items are dicts of (seq_len,)
    int64 tensors. `cache`: build the sample indexes once into that cache and memory-map them
    (`megaqwen.data.index_cache`); None builds them in this process's memory.
    """
    if isinstance(source, BlendRecipe):
        recipe = source
    elif isinstance(source, (str, Path)) and str(source).endswith(".json"):
        recipe = load_blend_recipe(source)
    elif isinstance(source, (str, Path)):
        recipe = make_recipe([str(source)], name=Path(source).name)
    else:
        recipe = make_recipe(list(source))
    draws = max_draws(list(recipe.weights), num_samples)
    shards = [IndexedDataset(p) for p in recipe.prefixes]
    if documents is not None:
        shards = [documents(s) for s in shards]
    formats = {getattr(s, "data_format", "text") for s in shards}
    if "dpo" in formats and len(shards) > 1:
        raise ValueError(f"{recipe.name}: a dpo shard cannot be blended (a blend draws rows one by one "
                         "and would split its pairs); give its prefix alone, or concatenate the sources "
                         "before tokenising")
    datasets = [PairDataset(s, seq_len, n, seed, **packing) if getattr(s, "data_format", "text") == "dpo"
                else GPTDataset(s, seq_len, n, seed, cache=cache, **packing) for s, n in zip(shards, draws)]
    if len(datasets) == 1:
        return datasets[0]
    return BlendedDataset(datasets, list(recipe.weights), num_samples, name=recipe.name, cache=cache,
                          beside=recipe.prefixes[0])
