"""From a planned meta-device model to this rank's real shards: fresh init or sharded loading.

    materialize(model, shards, device, seed)                  # allocate local pieces, draw init values
    materialize(model, shards, device, filler=hf_filler(...)) # or read them from HF safetensors

Every parameter's local piece is a box of its full tensor (`ShardMap.box`: the TP piece, then
FSDP2's chunk of it). A *filler* writes one parameter's piece: `init_filler` draws it from
`megaqwen.parallel.init` (seeded per parameter name and tile, so any layout assembles the same full
tensors); `hf_filler` reads only the box from the safetensors file, opening and closing the file per
tensor so a rank never maps more than one full tensor's pages. DeepSpeed ZeRO-3 uses the same
fillers block by block inside its own partitioned construction (`deepspeed_engine.materialize_zero3`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from megaqwen.parallel.init import default_seed, fill_box
from megaqwen.parallel.shards import ShardMap, local_tensor

log = logging.getLogger(__name__)

Filler = Callable[[str, torch.Tensor], None]
"""filler(fqn, param): write this rank's values of parameter `fqn` into `param` (plain or FSDP2
DTensor, already allocated)."""


def init_filler(model: nn.Module, shards: ShardMap, seed: int | None = None,
                param_init: Callable | None = None) -> Filler:
    """Fresh initial values (the model's `param_init` per name), drawn for this rank's box only."""
    seed = default_seed() if seed is None else seed
    param_init = param_init or model.param_init

    def fill(fqn: str, p: torch.Tensor) -> None:
        fill_box(local_tensor(p), param_init(fqn), seed, fqn, shards.full_shape(fqn, p), shards.box(fqn, p))

    return fill


@torch.no_grad()
def materialize(model: nn.Module, shards: ShardMap, device: str | torch.device, seed: int | None = None,
                filler: Filler | None = None) -> nn.Module:
    """Allocate this rank's pieces of a meta-device model on `device` and fill them (default: fresh
    init from `seed`; the same seed gives the same full tensors under every layout)."""
    filler = filler or init_filler(model, shards, seed)
    model.to_empty(device=device)
    if shards.pp_views:  # pipeline stage modules that FSDP2 manages sit outside the model's tree
        from megaqwen.parallel.pipeline import after_materialize

        after_materialize(shards.pp_views)
    for fqn, p in model.named_parameters():
        filler(fqn, p)
    return model


def hf_weight_files(hf_dir: Path) -> dict[str, Path]:
    """safetensors key -> the file holding it, for a single-file or index-sharded HF folder."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.exists():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: hf_dir / f for k, f in weight_map.items()}
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def hf_filler(model: nn.Module, shards: ShardMap, hf_dir: str | Path,
              hf_key: Callable[[str], str] = lambda fqn: fqn, optional: set[str] = frozenset()) -> Filler:
    """Values read from an HF folder's safetensors, this rank's box only. Keys in `optional` may be
    in the files without a parameter (a tied head's copy); any other mismatch fails here, before
    anything is read."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    files = hf_weight_files(hf_dir)
    params = dict(model.named_parameters())
    wanted = {hf_key(fqn) for fqn in params}
    # grad-free state that starts at zero (the aux-loss-free routing bias) has no place in stock
    # HF checkpoints: absent, it starts at zero as in a fresh run
    zero_ok = {hf_key(f) for f, p in params.items() if not p.requires_grad
               and getattr(model, "param_init", None) and model.param_init(f).kind == "zeros"}
    missing = sorted(wanted - set(files) - zero_ok)
    extra = sorted(set(files) - wanted - set(optional))
    if missing or extra:
        raise ValueError(f"{hf_dir}: weights do not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                         f"{'...' if len(extra) > 5 else ''}")

    @torch.no_grad()
    def fill(fqn: str, p: torch.Tensor) -> None:
        key = hf_key(fqn)
        if key not in files:  # one of `zero_ok`
            local_tensor(p).zero_()
            return
        full, box = shards.full_shape(fqn, p), shards.box(fqn, p)
        with safe_open(files[key], "pt") as f:  # closed per tensor: mapped pages are released
            sl = f.get_slice(key)
            if tuple(sl.get_shape()) != tuple(full):
                raise ValueError(f"{files[key]}: {key} has shape {tuple(sl.get_shape())}, the model "
                                 f"expects {tuple(full)}")
            piece = sl[tuple(slice(a, b) for a, b in box)]
        local_tensor(p).copy_(piece)

    return fill


@torch.no_grad()
def load_hf_sharded(model: nn.Module, shards: ShardMap, hf_dir: str | Path,
                    hf_key: Callable[[str], str] = lambda fqn: fqn,
                    optional: set[str] = frozenset()) -> nn.Module:
    """Fill every (already allocated) parameter's local piece from an HF folder, slice by slice."""
    fill = hf_filler(model, shards, hf_dir, hf_key, optional)
    n = 0
    for fqn, p in model.named_parameters():
        fill(fqn, p)
        n += 1
    log.info("loaded %d tensors from %s (this rank's slices only)", n, hf_dir)
    return model
