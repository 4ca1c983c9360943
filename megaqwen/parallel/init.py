"""Layout-independent initialisation: any slice of a parameter is drawn without the rest of it.

Each parameter's full tensor is cut into fixed tiles of TILE = (rows, cols); every tile has its own
seed, hashed from (run seed, parameter name, tile index), and is drawn on the CPU generator. A rank
that holds rows 100..611 of an embedding table (a vocab-parallel shard, or an FSDP chunk of
one) draws only the tiles overlapping its box and keeps its part, so the full tensor assembled
from any tp/dp/FSDP split is bit-identical to the single-process one, and 72B is never drawn whole
anywhere. Drawing on the CPU also makes the values independent of the device type.

Cost: ~1.5 s per 100M parameters on one CPU core (the 0.5B config: ~7 s in one process); a
row-parallel shard (columns of a matrix) draws whole tiles and keeps a 1/tp slice of each, so those
parameters cost tp times their share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

TILE = (256, 1024)
"""Tile of the full tensor (rows, cols) that one seed draws; 1-D tensors are one column."""

Box = Sequence[tuple[int, int]]
"""Per dimension, the [start, stop) of a local piece inside the full tensor."""


def tile_seed(seed: int, name: str, i: int, j: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{name}|{i}|{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _normal_box(seed: int, name: str, full_shape: Sequence[int], box: Box, std: float) -> torch.Tensor:
    """fp32 CPU tensor of the box's values of Normal(0, std) over the full tensor."""
    if len(full_shape) > 2:
        raise ValueError(f"{name}: init of {len(full_shape)}-D tensors is not supported (<= 2-D)")
    rows, cols = full_shape[0], (full_shape[1] if len(full_shape) == 2 else 1)
    (r0, r1), (c0, c1) = box[0], (box[1] if len(box) == 2 else (0, 1))
    tr, tc = TILE
    out = torch.empty(r1 - r0, c1 - c0)
    g = torch.Generator()
    for i in range(r0 // tr, -(-r1 // tr)):
        ta, tb = i * tr, min((i + 1) * tr, rows)
        for j in range(c0 // tc, -(-c1 // tc)):
            ua, ub = j * tc, min((j + 1) * tc, cols)
            g.manual_seed(tile_seed(seed, name, i, j))
            tile = torch.randn(tb - ta, ub - ua, generator=g)
            ra, rb, ca, cb = max(ta, r0), min(tb, r1), max(ua, c0), min(ub, c1)
            out[ra - r0:rb - r0, ca - c0:cb - c0] = tile[ra - ta:rb - ta, ca - ua:cb - ua]
    out.mul_(std)
    return out.view([b - a for a, b in box])


@torch.no_grad()
def fill_box(local: torch.Tensor, init, seed: int, name: str, full_shape: Sequence[int], box: Box) -> None:
    """Write parameter `name`'s initial values for `box` of its full tensor into `local` (any
    device/dtype; its shape is the box's). `init` is a ParamInit (kind normal | zeros | ones)."""
    want = tuple(b - a for a, b in box)
    if tuple(local.shape) != want:
        raise ValueError(f"{name}: local shape {tuple(local.shape)} does not match its box {want}")
    if len(box) != len(full_shape) or any(not 0 <= a <= b <= n for (a, b), n in zip(box, full_shape)):
        raise ValueError(f"{name}: box {list(box)} is outside the full shape {tuple(full_shape)}")
    if local.numel() == 0:
        return
    if init.kind == "zeros":
        local.zero_()
    elif init.kind == "ones":
        local.fill_(1.0)
    elif init.kind == "normal":
        local.copy_(_normal_box(seed, name, full_shape, box, init.std))
    else:
        raise ValueError(f"{name}: unknown init kind {init.kind!r} (normal | zeros | ones)")


def full_box(shape: Sequence[int]) -> list[tuple[int, int]]:
    return [(0, n) for n in shape]


def default_seed() -> int:
    """A seed drawn from torch's global RNG: `torch.manual_seed(s)` makes the build reproducible."""
    return int(torch.randint(0, 2**62, (1,)).item())


def materialize_single(model: nn.Module, device: str | torch.device, seed: int | None = None,
                       param_init: Callable | None = None) -> nn.Module:
    """A meta-device model, unsharded, allocated on `device` and initialised from `seed`."""
    seed = default_seed() if seed is None else seed
    param_init = param_init or model.param_init
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        fill_box(p.data, param_init(name), seed, name, p.shape, full_box(p.shape))
    return model
