"""Re-mixing: the sampling plan of each training stage, and blend recipes the trainer reads.

Plan: start from target token shares (explicit `weights`, or the natural shares times `factors`),
then cap every domain at `max_epochs * tokens_d / token_budget` and hand what the capped domains
cannot supply to the others in proportion to their targets (water-filling), so no domain repeats
more than `max_epochs` times in the stage.

Everything else is the trainer's own code (`megaqwen.data.blend`): recipes are written in its
format and read back with `load_blend_recipe` before they are kept, and `measure_blend` draws from
`build_dataset` (Megatron-style deficit-greedy `BlendedDataset` over packed `GPTDataset`s), so the
measured mix is exactly what a training run on the recipe will see.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megaqwen.data_pipeline.config import StageMix

log = logging.getLogger("megaqwen.data_pipeline.remix")


def target_shares(tokens: dict[str, int], stage: StageMix) -> dict[str, float]:
    """Uncapped target shares over the domains that have tokens (sum 1)."""
    have = {d: t for d, t in tokens.items() if t > 0}
    if not have:
        raise ValueError("no domain has any tokens: nothing to mix")
    total = sum(have.values())
    if stage.weights:
        raw = {d: float(stage.weights.get(d, 0.0)) for d in have}
    else:
        raw = {d: t / total * float(stage.factors.get(d, 1.0)) for d, t in have.items()}
    z = sum(raw.values())
    if z <= 0:
        raise ValueError(
            f"stage {stage.name!r}: all target weights are 0 over the domains with tokens {sorted(have)} "
            f"(weighted domains with no documents: {missing_domains(tokens, stage)})"
        )
    return {d: w / z for d, w in raw.items()}


def missing_domains(tokens: dict[str, int], stage: StageMix) -> list[str]:
    """Domains the stage's explicit weights ask for that ended up with no tokens (all filtered out)."""
    return sorted(d for d, w in stage.weights.items() if w > 0 and tokens.get(d, 0) <= 0)


def plan_stage(tokens: dict[str, int], stage: StageMix) -> dict[str, Any]:
    """Final shares after the epoch cap, with the expected epochs of every domain.

    A weighted domain left with no documents cannot be drawn: its weight goes to the others in
    proportion (renormalisation), with a warning, and is listed under "missing" in the plan (and so
    in the recipe's meta, stats.json and the report) rather than failing the run at its last stage.
    """
    target = target_shares(tokens, stage)
    missing = missing_domains(tokens, stage)
    if missing:
        lost = sum(stage.weights[d] for d in missing) / sum(stage.weights.values())
        log.warning(
            "stage %r: weighted domains %s have no documents; their %.1f%% of the weight is spread over "
            "the others", stage.name, missing, 100 * lost,
        )  # fmt: skip
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
    return {
        "target": target,
        "weights": shares,
        "capped": sorted(capped),
        "epochs": epochs,
        "missing": missing,
    }


def meta_path(recipe_path: Path) -> Path:
    """Sidecar of a recipe (`<name>.meta.json`): the plan behind it, which recipes have no room for."""
    return Path(recipe_path).with_name(Path(recipe_path).name.removesuffix(".json") + ".meta.json")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_recipe(
    path: Path, stage: StageMix, plan: dict[str, Any], prefixes: dict[str, str], tokens: dict[str, int]
) -> dict[str, Any]:
    """Write the trainer's recipe `{"name", "description", "datasets": [{"prefix", "weight"}]}` and,
    beside it, `<name>.meta.json` with the stage's plan (seq_length, rope_base, caps, epochs).

    `prefixes` maps each domain's name to its shard prefix, relative to the recipe file's folder (the
    shard files are named by the domain's slug: `social media` -> `../shards/social-media`). The
    recipe holds only prefixes, as the trainer reads it; the plan keeps the domain names, with
    `shards` mapping each name to its prefix. The recipe is loaded back with the trainer's
    `load_blend_recipe` before it replaces an older one, so a recipe the trainer rejects is never kept.
    """
    from megaqwen.data.blend import load_blend_recipe

    datasets = [
        {"prefix": prefixes[d], "weight": round(w, 8)} for d, w in sorted(plan["weights"].items()) if w > 0
    ]
    recipe = {
        "name": stage.name,
        # the trainer reads prefixes only; the description names each domain's shard for people
        "description": (
            f"data pipeline stage {stage.name}: seq_length {stage.seq_length}, rope_base {stage.rope_base}, "
            f"token_budget {stage.token_budget}, max_epochs {stage.max_epochs} "
            f"(plan: {meta_path(path).name}); domains: "
            + ", ".join(f"{d} = {prefixes[d]}" for d, w in sorted(plan["weights"].items()) if w > 0)
        ),
        "datasets": datasets,
    }
    meta = {
        "name": stage.name,
        "seq_length": stage.seq_length,
        "rope_base": stage.rope_base,
        "token_budget": stage.token_budget,
        "max_epochs": stage.max_epochs,
        "domain_tokens": tokens,
        "shards": {d: prefixes[d] for d in sorted(plan["weights"])},
        "target_weights": plan["target"],
        "weights": plan["weights"],
        "capped": plan["capped"],
        "missing": plan["missing"],
        "expected_epochs": plan["epochs"],
        "blending": "megaqwen.data.blend.BlendedDataset: sample i -> argmax_d(W_d * (i + 1) - Q * count_d)",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".check.json")
    tmp.write_text(json.dumps(recipe, indent=1))
    try:
        load_blend_recipe(tmp)  # the trainer's own validation
    except ValueError as e:
        tmp.unlink()
        raise ValueError(
            f"stage {stage.name!r}: the recipe for {path} is not loadable by the trainer: {e}"
        ) from e
    _atomic_write(meta_path(path), json.dumps(meta, indent=1))
    os.replace(tmp, path)
    return recipe


def measure_blend(recipe_path: Path, n_samples: int, seq_length: int) -> dict[str, dict[str, float]]:
    """What a training run on the recipe draws in its first `n_samples` sequences of `seq_length`.

    Built with the trainer's `build_dataset`, so the blend order (`BlendedDataset`, weights as exact
    integers over a common denominator) and the packing (`GPTDataset`, repeating epochs) are the
    trainer's. Per shard (by domain name, from the plan beside the recipe; else by prefix name): its
    recipe weight, the measured share of tokens, and the epochs read (tokens drawn / tokens in the
    shard).
    """
    from megaqwen.data.blend import BlendedDataset, build_dataset, load_blend_recipe

    recipe = load_blend_recipe(recipe_path)
    meta = meta_path(recipe_path)
    by_prefix = {}
    if meta.is_file():
        by_prefix = {Path(p).name: d for d, p in json.loads(meta.read_text()).get("shards", {}).items()}
    ds = build_dataset(recipe, seq_len=seq_length, num_samples=n_samples)
    draws = [0] * len(recipe.prefixes)
    if isinstance(ds, BlendedDataset):
        for i in range(n_samples):
            draws[ds.locate(i)[0]] += 1  # the (dataset, sample) pair `ds[i]` reads
        shards = [g.indexed for g in ds.datasets]
    else:  # a one-shard recipe: build_dataset returns the shard's GPTDataset itself
        draws[0] = n_samples
        shards = [ds.indexed]
    total = sum(draws) * seq_length
    return {
        by_prefix.get(Path(p).name, Path(p).name): {
            "weight": w,
            "measured": draws[d] * seq_length / total,
            "epochs": draws[d] * seq_length / shards[d].num_tokens,
        }
        for d, (p, w) in enumerate(zip(recipe.prefixes, recipe.weights))
    }


def cap_synthetic(
    synthetic: list[tuple[str, int, float]], real_tokens: dict[str, int], cap: Callable[[str], float]
) -> list[bool]:
    """Which synthetic documents (domain, tokens, judge score) stay so that, per domain, synthetic
    tokens are at most `cap(domain)` of the domain's tokens: syn <= cap / (1 - cap) * real. Highest
    score first; a document that does not fit is left out and smaller ones after it may still fit.
    Applied per input part (annotate), the bound holds for the sum over parts, so for the shards."""
    used: dict[str, int] = {}
    keep = [False] * len(synthetic)
    for i in sorted(range(len(synthetic)), key=lambda i: -synthetic[i][2]):
        dom, ntok, _ = synthetic[i]
        c = cap(dom)
        room = c / (1.0 - c) * real_tokens.get(dom, 0) - used.get(dom, 0)
        if ntok <= room:
            keep[i] = True
            used[dom] = used.get(dom, 0) + ntok
    return keep
