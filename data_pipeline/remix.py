"""Re-mixing: per-domain shards, a sampling plan per training stage, and Megatron-style blending.

Plan: start from target token shares (explicit `weights`, or the natural shares times `factors`),
then cap every domain at `max_epochs * tokens_d / token_budget` and hand what the capped domains
cannot supply to the others in proportion to their targets (water-filling), so no domain repeats
more than `max_epochs` times in the stage.

Blending (Megatron-LM `build_blending_indices`): sample i goes to the dataset whose weight is
furthest ahead of what it has received, argmax_d (w_d * (i + 1) - count_d). Deterministic, and
after n samples every dataset is within one sample of w_d * n.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from megaqwen.data_pipeline.config import StageMix


def target_shares(tokens: dict[str, int], stage: StageMix) -> dict[str, float]:
    """Uncapped target shares over the domains that have tokens (sum 1)."""
    have = {d: t for d, t in tokens.items() if t > 0}
    if not have:
        raise ValueError("no domain has any tokens: nothing to mix")
    total = sum(have.values())
    if stage.weights:
        raw = {d: float(stage.weights.get(d, 0.0)) for d in have}
        missing = sorted(d for d, w in stage.weights.items() if w > 0 and d not in have)
        if missing:
            raise ValueError(f"stage {stage.name!r}: weights name domains with no documents: {missing}")
    else:
        raw = {d: t / total * float(stage.factors.get(d, 1.0)) for d, t in have.items()}
    z = sum(raw.values())
    if z <= 0:
        raise ValueError(f"stage {stage.name!r}: all target weights are 0")
    return {d: w / z for d, w in raw.items()}


def plan_stage(tokens: dict[str, int], stage: StageMix) -> dict[str, Any]:
    """Final shares after the epoch cap, with the expected epochs of every domain."""
    target = target_shares(tokens, stage)
    shares = dict(target)
    capped: set[str] = set()
    if stage.token_budget > 0:
        cap = {d: stage.max_epochs * tokens[d] / stage.token_budget for d in target}
        while True:
            over = {d for d in shares if d not in capped and shares[d] > cap[d] + 1e-12}
            if not over:
                break
            capped |= over
            free = 1.0 - sum(cap[d] for d in capped)
            rest = {d: target[d] for d in target if d not in capped}
            z = sum(rest.values())
            if z <= 0 or free < 0:
                supply = sum(stage.max_epochs * tokens[d] for d in target)
                raise ValueError(
                    f"stage {stage.name!r}: a budget of {stage.token_budget} tokens needs more than "
                    f"max_epochs={stage.max_epochs} passes over the data ({supply} tokens at most); "
                    f"raise max_epochs or lower token_budget"
                )
            shares = {d: cap[d] if d in capped else free * target[d] / z for d in target}
    epochs = {d: shares[d] * stage.token_budget / tokens[d] if stage.token_budget else None for d in shares}
    return {"target": target, "weights": shares, "capped": sorted(capped), "epochs": epochs}


def blend_indices(weights: list[float], n: int) -> np.ndarray:
    """(n,) dataset index of each sample, Megatron's greedy 'furthest behind its target' rule."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.zeros(len(w))
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        d = int(np.argmax(w * (i + 1) - counts))
        out[i] = d
        counts[d] += 1
    return out


def write_recipe(
    path: Path, stage: StageMix, plan: dict[str, Any], prefixes: dict[str, str], tokens: dict[str, int]
) -> dict[str, Any]:
    """Write `{"name", "datasets": [{"prefix", "weight"}], "meta": {...}}`.

    Prefixes are relative to the recipe file's folder.
    """
    datasets = [
        {"prefix": prefixes[d], "weight": round(w, 8)} for d, w in sorted(plan["weights"].items()) if w > 0
    ]
    recipe = {
        "name": stage.name,
        "datasets": datasets,
        "meta": {
            "seq_length": stage.seq_length,
            "rope_base": stage.rope_base,
            "token_budget": stage.token_budget,
            "max_epochs": stage.max_epochs,
            "domain_tokens": tokens,
            "target_weights": plan["target"],
            "capped": plan["capped"],
            "expected_epochs": plan["epochs"],
            "blending": "megatron: sample i -> argmax_d(weight_d * (i + 1) - count_d)",
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(recipe, indent=1))
    os.replace(tmp, path)
    return recipe


def load_recipe(path: Path) -> list[tuple[Path, float]]:
    """(absolute prefix, weight) pairs of a recipe file."""
    rec = json.loads(Path(path).read_text())
    if "datasets" not in rec or not rec["datasets"]:
        raise ValueError(f"{path}: a blend recipe needs a non-empty 'datasets' list")
    out = []
    for d in rec["datasets"]:
        p = Path(d["prefix"])
        out.append((p if p.is_absolute() else Path(path).parent / p, float(d["weight"])))
    return out


def measure_blend(recipe_path: Path, n_samples: int, seq_length: int) -> dict[str, dict[str, float]]:
    """Blend `n_samples` sequences of `seq_length` tokens from the recipe's shards and count the tokens
    actually read from each shard (cycling a shard when exhausted), as the trainer's sampler does."""
    from megaqwen.data.indexed import IndexedDataset

    parts = load_recipe(recipe_path)
    data = [IndexedDataset(p) for p, _ in parts]
    flat = [
        np.concatenate([ds[i] for i in range(len(ds))]) if len(ds) else np.zeros(0, np.int32) for ds in data
    ]
    pos = [0] * len(parts)
    got = np.zeros(len(parts))
    for d in blend_indices([w for _, w in parts], n_samples):
        need = seq_length
        while need:  # read `need` tokens, wrapping around at the end of the shard
            take = min(need, len(flat[d]) - pos[d] % len(flat[d]))
            got[d] += take
            pos[d] += take
            need -= take
    total = got.sum()
    return {
        p.name: {"weight": w, "measured": float(got[i] / total), "epochs": float(pos[i] / len(flat[i]))}
        for i, (p, w) in enumerate(parts)
    }
