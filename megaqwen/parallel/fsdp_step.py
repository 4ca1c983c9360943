"""FSDP2 inside one optimizer step: when gathered parameters are freed, what is prefetched, and a
count of the parameter all-gathers the step really issues.

`parallel.data_parallel.apply_fsdp` makes U = L + 1 units (FSDP parameter groups): one per decoder
layer and the root (embedding, final norm, head). Per optimizer step of M micro-batches (gradient
accumulation, `train.loop` through `setup.grad_sync`), parameter all-gathers on each rank:

  policy                        forward          backward re-gathers       per step
  reshard (keep_gathered=false) U per micro-b.   L per micro-batch         M (2L + 1)
    with reshard_after_forward  (every unit)     (the root and every layer
                                                  but the last, which is not
                                                  freed after forward)
  reshard, no reshard after fwd U per micro-b.   0                         M (L + 1)
  keep_gathered=true            U, first m.-b.   0                         L + 1

`keep_gathered` frees nothing between the micro-batches of a step (`set_reshard_after_forward(False)`
at wrap time, `set_reshard_after_backward` true only on the last micro-batch): M-fold fewer
all-gathers, for the memory of the whole model's gathered compute-dtype weights (2 bytes per
parameter in bf16) held through the step. FSDP2 already keeps unsharded fp32 gradients (4 bytes per
parameter) between micro-batches, since gradients reduce-scatter on the last one only, so with
M > 1 the extra is half of what gradient accumulation already costs. The planner models the same
numbers (`plan.perf.fsdp_all_gathers_per_step`, `plan.memory`); tests count them with
`count_param_all_gathers`.

Overlap: FSDP2 issues all-gathers and reduce-scatters on their own streams; `set_prefetch` makes
each layer's forward ask for the next layer's all-gather and each layer's backward for the previous
layer's, issued from the CPU before the current layer's compute (FSDP2's implicit prefetch issues
it only when the next layer starts), so on CUDA communication runs under the current layer's GEMMs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn as nn


def set_prefetch(blocks: list[nn.Module]) -> None:
    """Explicit one-ahead prefetch between consecutive FSDP2 layers (forward: i -> i + 1, backward:
    i -> i - 1)."""
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])


def microbatch_sync(model: nn.Module, last: bool, keep_gathered: bool) -> None:
    """Before one micro-batch of an FSDP2 root `model`: reduce-scatter gradients only on the `last`
    micro-batch of the step; with `keep_gathered`, also keep every unit gathered after backward
    except on the last one (the parameters are then reused by the next micro-batch's forward)."""
    model.set_requires_gradient_sync(last)
    if keep_gathered:
        model.set_reshard_after_backward(last)


@dataclass
class AllGatherCount:
    """Parameter all-gathers seen inside `count_param_all_gathers`, by FSDP unit name."""

    by_unit: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_unit.values())


@contextlib.contextmanager
def count_param_all_gathers() -> Iterator[AllGatherCount]:
    """Count FSDP2 parameter all-gathers issued inside the block, by unit. Reads the profiler ranges
    FSDP2 records around each all-gather ("FSDP::all_gather (<unit fqn>)"), so nothing of FSDP is
    patched; a unit already gathered issues none (and records none). CPU-side ranges only: works on
    CPU (gloo) and CUDA alike. The counts are filled when the block exits."""
    from torch.profiler import ProfilerActivity, profile

    out = AllGatherCount({})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield out
    for ev in prof.events():
        name = ev.name
        if name.startswith("FSDP::all_gather") and not name.startswith("FSDP::all_gather_copy_out"):
            unit = name[len("FSDP::all_gather"):].strip(" ()") or "<root>"
            out.by_unit[unit] = out.by_unit.get(unit, 0) + 1
