"""MoE metrics for the run record: expert load per layer, drops, router losses; a load heat map.

Input: `collect_load(model, dp_group)` (megaqwen.parallel.expert_parallel), called once per optimizer
step: {block FQN: LayerLoad(load_E, dropped)} summed over the dp ranks; under pipeline parallelism
`gather_stage_loads` merges every stage's layers. Load is reported relative
to perfect balance (fraction x the layer's expert count): 1.0 everywhere is balanced, 3.0 means an expert took
3x its share. All values are plain floats, ready for the metrics JSONL and W&B:

  moe/L{i}/load_max, moe/L{i}/load_min   most / least loaded expert of layer i (relative)
  moe/L{i}/dropped_frac                  share of layer i's assignments over capacity
  moe/L{i}/e{e}                          relative load of every expert (only when layers x experts
                                         <= per_expert_limit; the heat map shows the rest)
  moe/load_max, moe/load_max_mean        worst layer's load_max, and the mean over layers
  moe/dropped, moe/dropped_frac          assignments dropped this step, over all layers
  aux_loss, z_loss                       router losses when given (already dp-averaged; aux_loss in
                                         the model.moe_balance form)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_LAYER = re.compile(r"layers\.(\d+)\.")


def _layer(name: str) -> str:
    m = _LAYER.search(name + ".")
    return m.group(1) if m else name


def moe_metrics(loads: dict, aux_loss: float | None = None, z_loss: float | None = None,
                per_expert_limit: int = 512) -> dict[str, float]:
    """Flat metrics of one step's (or interval's) load; {} for a dense model with no losses."""
    out: dict[str, float] = {}
    if loads:
        n_cells = sum(ld.load_E.numel() for ld in loads.values())
        maxes, dropped, routed = [], 0.0, 0.0
        for name, ld in loads.items():
            i, load = _layer(name), ld.load_E.float()
            total = float(load.sum())
            rel = load * load.numel() / max(total, 1.0)  # 1.0 = its fair share
            out[f"moe/L{i}/load_max"] = float(rel.max())
            out[f"moe/L{i}/load_min"] = float(rel.min())
            out[f"moe/L{i}/dropped_frac"] = ld.dropped / max(total, 1.0)
            if n_cells <= per_expert_limit:
                out.update({f"moe/L{i}/e{e}": float(v) for e, v in enumerate(rel)})
            maxes.append(float(rel.max()))
            dropped, routed = dropped + ld.dropped, routed + total
        out["moe/load_max"] = max(maxes)
        out["moe/load_max_mean"] = sum(maxes) / len(maxes)
        out["moe/dropped"] = dropped
        out["moe/dropped_frac"] = dropped / max(routed, 1.0)
    if aux_loss is not None:
        out["aux_loss"] = float(aux_loss)
    if z_loss is not None:
        out["z_loss"] = float(z_loss)
    return out


def gather_stage_loads(loads: dict, pp_group) -> dict:
    """Collective over the pipeline group: every stage's per-layer loads (each stage holds its own
    layers' counters), merged in layer order, so the metrics and the heat map cover the whole model."""
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, {n: (ld.load_E.cpu(), ld.dropped) for n, ld in loads.items()},
                           group=pp_group)
    from megaqwen.parallel.expert_parallel import LayerLoad

    merged = {n: LayerLoad(load, dropped) for part in parts for n, (load, dropped) in part.items()}
    return dict(sorted(merged.items(), key=lambda kv: int(_layer(kv[0])) if _layer(kv[0]).isdigit() else 0))


def add_loads(total: dict | None, loads: dict) -> dict:
    """Sum per-step loads over a logging interval (for a heat map of the interval)."""
    from megaqwen.parallel.expert_parallel import LayerLoad

    if not total:
        return dict(loads)
    return {n: LayerLoad(total[n].load_E + ld.load_E, total[n].dropped + ld.dropped) if n in total else ld
            for n, ld in loads.items()}


def load_heatmap(loads: dict, path: str | Path, title: str = "expert load") -> Path:
    """PNG: sparse layers (rows) x experts (columns), colour = load relative to a fair share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(loads, key=lambda n: int(_layer(n)) if _layer(n).isdigit() else 0)
    rel = torch.stack([loads[n].load_E.float() * loads[n].load_E.numel()
                       / loads[n].load_E.float().sum().clamp(min=1) for n in names])  # (L, E)
    e = rel.shape[1]
    fig, ax = plt.subplots(figsize=(min(2 + 0.12 * e, 18), 1 + 0.35 * len(names)))
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                   vmin=0.0, vmax=max(2.0, float(rel.max())))
    ax.set_yticks(range(len(names)), [f"L{_layer(n)}" for n in names])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / fair share")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
